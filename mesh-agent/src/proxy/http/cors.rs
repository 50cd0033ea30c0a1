//! The `CORS` filter (Gateway API's HTTPCORSFilter), as pure decisions: whether a
//! request is a CORS preflight the agent answers itself, and which headers the answer
//! (or the backend's response to an actual request) gets. An origin that is not
//! allowed gets no CORS headers at all, so the browser refuses the response.
use http::{HeaderMap, HeaderValue, Method, header};

use crate::config::Cors;

/// What the filter does with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// No `Origin`: not a CORS request; forwarded untouched.
    NotCors,
    /// A preflight: answered here with 200 and these headers.
    Preflight(HeaderMap),
    /// An actual request: forwarded, and these headers added to the response.
    Actual(HeaderMap),
}

/// `*`, an exact origin, or one with a `*` for the leftmost host labels
/// (`https://*.example.com`); compared without case.
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    let origin = origin.to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        if a == "*" || a == origin {
            return true;
        }
        match a.split_once("://*.") {
            Some((scheme, rest)) => origin
                .strip_prefix(&format!("{scheme}://"))
                .is_some_and(|host| host.ends_with(&format!(".{rest}"))),
            None => false,
        }
    })
}

fn value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

fn insert(h: &mut HeaderMap, name: &'static str, v: Option<HeaderValue>) {
    if let Some(v) = v {
        h.insert(name, v);
    }
}

/// The decision for a request with `method` and `headers` under filter `c`.
pub fn evaluate(c: &Cors, method: &Method, headers: &HeaderMap) -> Step {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Step::NotCors;
    };
    let preflight =
        method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut out = HeaderMap::new();
    out.insert(header::VARY, HeaderValue::from_static("origin"));
    if origin_allowed(&c.allow_origins, origin) {
        // With credentials a browser refuses `*`: the origin itself is named.
        let wildcard = c.allow_origins.iter().any(|o| o == "*") && !c.allow_credentials;
        insert(
            &mut out,
            "access-control-allow-origin",
            if wildcard { value("*") } else { value(origin) },
        );
        if c.allow_credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if preflight {
            let echo = |name: header::HeaderName| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let list = |v: &[String], requested: Option<String>| {
                if v.iter().any(|m| m == "*") {
                    // With credentials `*` is literal to a browser: echo the request.
                    if c.allow_credentials {
                        requested
                    } else {
                        Some("*".to_owned())
                    }
                } else if v.is_empty() {
                    None
                } else {
                    Some(v.join(", "))
                }
            };
            let methods = list(
                &c.allow_methods,
                echo(header::ACCESS_CONTROL_REQUEST_METHOD),
            );
            insert(
                &mut out,
                "access-control-allow-methods",
                methods.as_deref().and_then(value),
            );
            let allowed_headers = list(
                &c.allow_headers,
                echo(header::ACCESS_CONTROL_REQUEST_HEADERS),
            );
            insert(
                &mut out,
                "access-control-allow-headers",
                allowed_headers.as_deref().and_then(value),
            );
            insert(
                &mut out,
                "access-control-max-age",
                value(&c.max_age.to_string()),
            );
        } else if !c.expose_headers.is_empty() {
            insert(
                &mut out,
                "access-control-expose-headers",
                value(&c.expose_headers.join(", ")),
            );
        }
    }
    if preflight {
        Step::Preflight(out)
    } else {
        Step::Actual(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors() -> Cors {
        Cors {
            allow_origins: vec![
                "https://app.example".into(),
                "https://*.shop.example".into(),
            ],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-token".into()],
            expose_headers: vec!["x-trace".into()],
            allow_credentials: true,
            max_age: 600,
        }
    }

    fn req(origin: Option<&str>, preflight: bool) -> (Method, HeaderMap) {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(
                header::ORIGIN,
                HeaderValue::from_str(o).unwrap_or(HeaderValue::from_static("x")),
            );
        }
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_METHOD,
                HeaderValue::from_static("POST"),
            );
            return (Method::OPTIONS, h);
        }
        (Method::GET, h)
    }

    fn get<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
        h.get(k).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered_with_the_policy() {
        let (m, h) = req(Some("https://app.example"), true);
        let Step::Preflight(out) = evaluate(&cors(), &m, &h) else {
            panic!("not a preflight")
        };
        assert_eq!(
            get(&out, "access-control-allow-origin"),
            Some("https://app.example")
        );
        assert_eq!(get(&out, "access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(get(&out, "access-control-allow-headers"), Some("x-token"));
        assert_eq!(get(&out, "access-control-max-age"), Some("600"));
        assert_eq!(get(&out, "access-control-allow-credentials"), Some("true"));
    }

    #[test]
    fn other_origins_get_no_cors_headers_and_plain_requests_pass() {
        let (m, h) = req(Some("https://evil.example"), true);
        let Step::Preflight(out) = evaluate(&cors(), &m, &h) else {
            panic!("not a preflight")
        };
        assert_eq!(get(&out, "access-control-allow-origin"), None);
        let (m, h) = req(Some("https://a.shop.example"), false);
        let Step::Actual(out) = evaluate(&cors(), &m, &h) else {
            panic!("not actual")
        };
        assert_eq!(
            get(&out, "access-control-allow-origin"),
            Some("https://a.shop.example")
        );
        assert_eq!(get(&out, "access-control-expose-headers"), Some("x-trace"));
        let (m, h) = req(None, false);
        assert_eq!(evaluate(&cors(), &m, &h), Step::NotCors);
        assert!(!origin_allowed(
            &cors().allow_origins,
            "https://shop.example"
        ));
        assert!(!origin_allowed(
            &cors().allow_origins,
            "http://a.shop.example"
        ));
    }
}
