//! `x-request-id`: kept when the client sent one (so a request keeps its id across
//! every hop and in the application's logs), made up when it did not, as Envoy does.
//! Trace context (`traceparent`, `tracestate`, B3) passes through untouched: the agent
//! forwards every end-to-end header.
use http::{HeaderMap, HeaderValue};

pub const HEADER: &str = "x-request-id";

/// A random (version 4) UUID in its text form.
pub fn uuid_v4(bytes: [u8; 16]) -> String {
    let mut b = bytes;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Adds an `x-request-id` when the request has none (or an empty one).
pub fn ensure(headers: &mut HeaderMap) {
    let present = headers
        .get(HEADER)
        .is_some_and(|v| !v.as_bytes().is_empty());
    if present {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&uuid_v4(rand::random())) {
        headers.insert(HEADER, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_made_only_when_missing() {
        let mut h = HeaderMap::new();
        ensure(&mut h);
        let made = h
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let made = made.unwrap_or_default();
        assert_eq!(made.len(), 36, "{made}");
        assert_eq!(made.as_bytes()[14], b'4', "{made}");
        ensure(&mut h);
        assert_eq!(
            h.get(HEADER).and_then(|v| v.to_str().ok()),
            Some(made.as_str())
        );
        let mut kept = HeaderMap::new();
        kept.insert(HEADER, HeaderValue::from_static("abc"));
        ensure(&mut kept);
        assert_eq!(kept.get(HEADER).map(|v| v.as_bytes()), Some(&b"abc"[..]));
    }

    #[test]
    fn the_uuid_has_the_version_and_variant_bits() {
        assert_eq!(uuid_v4([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
    }
}
