//! One body type for every request and response the agent forwards: whatever hyper
//! received, streamed through (never buffered whole), or a short body it made itself.
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BodyError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn incoming(b: hyper::body::Incoming) -> Body {
    b.map_err(BodyError::from).boxed()
}
