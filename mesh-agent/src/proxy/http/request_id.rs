//! `x-request-id`: kept when the client sent one (so a request keeps its id across
//! every hop and in the application's logs), made up when it did not, as Envoy does.
//! Trace context (`traceparent`, `tracestate`, B3) passes through untouched: the agent
//! forwards every end-to-end header.
use http::{HeaderMap, HeaderValue};

pub const HEADER: &str = "x-request-id";

/// A random (version 4) UUID in its text form, written into a fixed buffer: every
/// request without an id gets one, so this is on the per-request path.
pub fn uuid_v4(bytes: [u8; 16]) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = bytes;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, x) in b.iter().enumerate() {
        // Dashes after the 4th, 6th, 8th and 10th bytes: 8-4-4-4-12 digits.
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = HEX[usize::from(x >> 4)];
        out[at + 1] = HEX[usize::from(x & 0x0f)];
        at += 2;
    }
    out
}

/// Adds an `x-request-id` when the request has none (or an empty one).
pub fn ensure(headers: &mut HeaderMap) {
    let present = headers
        .get(HEADER)
        .is_some_and(|v| !v.as_bytes().is_empty());
    if present {
        return;
    }
    if let Ok(v) = HeaderValue::from_bytes(&uuid_v4(rand::random())) {
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
        let text = |b| String::from_utf8_lossy(&uuid_v4(b)).into_owned();
        assert_eq!(text([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(text([0; 16]), "00000000-0000-4000-8000-000000000000");
        let mut counting = [0u8; 16];
        for (i, b) in counting.iter_mut().enumerate() {
            *b = i as u8 * 0x11;
        }
        assert_eq!(text(counting), "00112233-4455-4677-8899-aabbccddeeff");
    }
}
