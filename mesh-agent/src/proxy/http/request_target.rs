//! A request's method and path as the mesh routes, checks and delivers them: the
//! source agent puts them in this form before routing, and the destination agent
//! again before policy, so that the application receives exactly the path the policy
//! saw (see `authz::path`).
use std::borrow::Cow;

use http::{Method, Uri, request::Parts, uri::PathAndQuery};

use super::errors::Failure;
use crate::authz::path;

/// `path?query` with its path normalized; the query is left as sent.
pub fn normalize(path_and_query: &str) -> Result<Cow<'_, str>, Failure> {
    let (p, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    // `?x` (an empty path, which the URI parser accepts) is `/?x` to every server; a
    // policy must see `/`, not an empty path no pattern matches.
    let normal = if p.is_empty() {
        Cow::Owned("/".to_owned())
    } else {
        path::normalize(p).map_err(|e| Failure::BadRequest(e.to_string()))?
    };
    match normal {
        Cow::Borrowed(_) => Ok(Cow::Borrowed(path_and_query)),
        Cow::Owned(mut p) => {
            if let Some(q) = query {
                p.push('?');
                p.push_str(q);
            }
            Ok(Cow::Owned(p))
        }
    }
}

/// Methods are case-sensitive and every standard one is upper case; a policy names
/// them in upper case, so a request that spells one otherwise is refused rather than
/// let past a `methods` rule to an application that may not care (as Istio does).
pub fn check_method(m: &Method) -> Result<(), Failure> {
    if m.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(Failure::BadRequest(format!(
            "the method {m} is not in upper case"
        )));
    }
    Ok(())
}

/// The request's method checked and its URI's path normalized in place (scheme and
/// authority, when the request has them, are kept).
pub fn normalize_parts(parts: &mut Parts) -> Result<(), Failure> {
    check_method(&parts.method)?;
    let Some(pq) = parts.uri.path_and_query() else {
        return Ok(());
    };
    let Cow::Owned(normal) = normalize(pq.as_str())? else {
        return Ok(());
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query =
        Some(PathAndQuery::try_from(normal).map_err(|e| Failure::BadRequest(e.to_string()))?);
    parts.uri = Uri::from_parts(uri).map_err(|e| Failure::BadRequest(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn the_path_is_normalized_and_the_rest_of_the_uri_kept() {
        let mut p = parts("GET", "http://echo:8080/public/../%61dmin/x?q=/../y");
        normalize_parts(&mut p).unwrap();
        assert_eq!(p.uri.to_string(), "http://echo:8080/admin/x?q=/../y");
        let mut p = parts("POST", "/a/./b?x");
        normalize_parts(&mut p).unwrap();
        assert_eq!(p.uri.to_string(), "/a/b?x");
        // Already normal: the same URI, not rebuilt.
        let mut p = parts("GET", "/echo.Echo/Get");
        normalize_parts(&mut p).unwrap();
        assert_eq!(p.uri.to_string(), "/echo.Echo/Get");
    }

    #[test]
    fn bad_escapes_and_lower_case_methods_are_bad_requests() {
        for (m, u) in [("GET", "/a%zz"), ("GET", "/a%00"), ("post", "/admin/x")] {
            let e = normalize_parts(&mut parts(m, u)).unwrap_err();
            assert!(matches!(e, Failure::BadRequest(_)), "{m} {u}: {e}");
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        }
        assert!(matches!(normalize("/a%2?x"), Err(Failure::BadRequest(_))));
        // An empty path is the root, for routing, policy and the application alike.
        assert_eq!(normalize("?x=1").unwrap(), "/?x=1");
        assert_eq!(normalize("").unwrap(), "/");
        let mut p = parts("POST", "http://svc?x");
        normalize_parts(&mut p).unwrap();
        assert_eq!(p.uri.path(), "/");
        assert_eq!(p.uri.to_string(), "http://svc/?x");
        assert_eq!(normalize("/a/../b?c=%zz").unwrap(), "/b?c=%zz");
    }
}
