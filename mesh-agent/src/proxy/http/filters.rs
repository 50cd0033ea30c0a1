//! Gateway API filters as pure functions over request and response parts: header
//! modifiers, redirects (the whole `Location`), URL rewrites.
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{HeaderMods, PathModifier, Redirect, Rewrite};

/// Set, then add, then remove, as Gateway API orders them.
pub fn modify_headers(headers: &mut HeaderMap, mods: &HeaderMods) {
    let pair = |(n, v): &(String, String)| {
        Some((
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (name, value) in mods.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for (name, value) in mods.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for name in &mods.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a path modifier. `prefix` is the PathPrefix that matched, if the
/// match was one; `ReplacePrefixMatch` replaces exactly that part, element-wise
/// (`/prefix/one` with `/prefix` -> `/` is `/one`; `/prefix` alone is `/`).
pub fn modified_path(path: &str, modifier: &PathModifier, prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let rest = match prefix {
                Some("/") => path.strip_prefix('/').map(|r| {
                    if r.is_empty() {
                        String::new()
                    } else {
                        format!("/{r}")
                    }
                }),
                Some(p) => path.strip_prefix(p).map(str::to_owned),
                None => None,
            };
            let Some(rest) = rest else {
                return replacement.clone();
            };
            let out = format!("{}{rest}", replacement.trim_end_matches('/'));
            if out.is_empty() { "/".to_owned() } else { out }
        }
    }
}

/// What of the request a redirect keeps when the filter does not say.
pub struct RedirectFrom<'a> {
    pub scheme: &'a str,
    /// The request's host, without port.
    pub host: &'a str,
    /// The port the client dialled (the Service port).
    pub port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// The `Location` of a redirect. The port, when not given: the scheme's well-known
/// port if the filter changes the scheme, else the port the client dialled; a
/// well-known port for the scheme is left out.
pub fn location(r: &Redirect, from: &RedirectFrom<'_>, prefix: Option<&str>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(from.scheme);
    let host = r.hostname.as_deref().unwrap_or(from.host);
    let well_known = match scheme {
        "https" => 443,
        _ => 80,
    };
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, Some(_)) => well_known,
        (None, None) => from.port,
    };
    let path = match &r.path {
        Some(m) => modified_path(from.path, m, prefix),
        None => from.path.to_owned(),
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut out = if port == well_known {
        format!("{scheme}://{host}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    };
    if let Some(q) = from.query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The rewritten (authority, path) of a request.
pub fn rewrite(r: &Rewrite, authority: &str, path: &str, prefix: Option<&str>) -> (String, String) {
    let authority = r.hostname.clone().unwrap_or_else(|| authority.to_owned());
    let path = match &r.path {
        Some(m) => modified_path(path, m, prefix),
        None => path.to_owned(),
    };
    (authority, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_modifiers_set_add_remove() {
        let mut h = HeaderMap::new();
        h.insert("keep", "1".parse().unwrap());
        h.insert("replace", "old".parse().unwrap());
        h.insert("gone", "x".parse().unwrap());
        h.insert("multi", "a".parse().unwrap());
        modify_headers(
            &mut h,
            &HeaderMods {
                set: vec![("replace".into(), "new".into())],
                add: vec![("multi".into(), "b".into())],
                remove: vec!["gone".into()],
            },
        );
        assert_eq!(h["keep"], "1");
        assert_eq!(h["replace"], "new");
        assert!(h.get("gone").is_none());
        let multi: Vec<_> = h.get_all("multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
    }

    #[test]
    fn prefix_replacement_is_element_wise() {
        let rp = |p: &str| PathModifier::ReplacePrefixMatch(p.into());
        assert_eq!(
            modified_path("/prefix/one", &rp("/"), Some("/prefix")),
            "/one"
        );
        assert_eq!(
            modified_path("/strip-prefix", &rp("/"), Some("/strip-prefix")),
            "/"
        );
        assert_eq!(
            modified_path("/prefix/one", &rp("/xyz"), Some("/prefix")),
            "/xyz/one"
        );
        assert_eq!(
            modified_path("/prefix/one", &rp("/xyz/"), Some("/prefix")),
            "/xyz/one"
        );
        assert_eq!(modified_path("/a/b", &rp("/x"), Some("/")), "/x/a/b");
        assert_eq!(
            modified_path(
                "/anything",
                &PathModifier::ReplaceFullPath("/one".into()),
                None
            ),
            "/one"
        );
    }

    #[test]
    fn redirect_locations() {
        let from = RedirectFrom {
            scheme: "http",
            host: "echo",
            port: 8080,
            path: "/old/page",
            query: Some("a=1"),
        };
        let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(Into::into),
            hostname: host.map(Into::into),
            path: None,
            port,
            status: 302,
        };
        assert_eq!(
            location(&r(None, Some("example.org"), None), &from, None),
            "http://example.org:8080/old/page?a=1"
        );
        assert_eq!(
            location(&r(Some("https"), None, None), &from, None),
            "https://echo/old/page?a=1"
        );
        assert_eq!(
            location(&r(None, None, Some(80)), &from, None),
            "http://echo/old/page?a=1"
        );
        assert_eq!(
            location(&r(Some("https"), None, Some(8443)), &from, None),
            "https://echo:8443/old/page?a=1"
        );
        let mut with_path = r(None, None, None);
        with_path.path = Some(PathModifier::ReplacePrefixMatch("/new".into()));
        assert_eq!(
            location(&with_path, &from, Some("/old")),
            "http://echo:8080/new/page?a=1"
        );
    }
}
