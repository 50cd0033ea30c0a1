//! How the mesh reads a request path, so that the path a policy is checked against is
//! the path the application acts on.
//!
//! A policy that denies `/admin/*` is worth nothing if `/public/../admin/users` or
//! `/%61dmin/users` reaches an application that resolves it to `/admin/users`. So
//! every request's path is normalized once, at the source agent before routing and
//! again at the destination agent before policy (a peer is not trusted to have done
//! it), and the normalized path is what is routed, checked and delivered: the
//! application never sees a form the policy did not. The normalization is Istio's
//! default (`BASE`): RFC 3986 §6.2.2 (percent-encoded unreserved characters decoded,
//! other percent-encodings in upper case), backslashes as slashes, then dot segments
//! removed (§5.2.4). `%00` and malformed percent-encodings are refused.
//!
//! Slashes are left as sent (`//`, `%2F`), as Istio's default does, because
//! applications differ on them: many APIs carry a `%2F` inside one segment
//! (`/projects/group%2Fname`). Instead of choosing one reading for every application,
//! [`lenient`] gives the other reading (encoded slashes decoded, slashes merged, `;`
//! parameters dropped, as nginx, Tomcat and Spring read paths), and policy allows a
//! request only if both readings are allowed (`Policies::check_request`).
use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has a malformed percent-encoding at byte {0}")]
    BadEscape(usize),
    #[error("the path has an encoded NUL (%00)")]
    Nul,
}

/// A path (without its query) as routed, checked and delivered. Borrowed when it is
/// normal already, which is almost always: a scan for `%`, `\` and `.` segments.
/// The asterisk form (`OPTIONS *`) and anything else that is not an absolute path
/// are left alone.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || !(path.contains(['%', '\\']) || has_dot_segment(path)) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// The other reading of a normalized path: `%2F` and `%5C` as slashes, `;` parameters
/// dropped from each segment, empty segments merged, dot segments removed again.
/// `None` when it reads the same.
pub fn lenient(normalized: &str) -> Option<String> {
    if !normalized.starts_with('/')
        || !(normalized.contains(['%', ';']) || normalized.contains("//"))
    {
        return None;
    }
    let slashed = decode_slashes(normalized);
    let segments: Vec<&str> = slashed
        .split('/')
        .map(|s| s.split_once(';').map_or(s, |(name, _)| name))
        .filter(|s| !s.is_empty())
        .collect();
    let mut merged = String::with_capacity(slashed.len());
    for s in &segments {
        merged.push('/');
        merged.push_str(s);
    }
    if merged.is_empty() || slashed.ends_with('/') {
        merged.push('/');
    }
    let read = remove_dot_segments(&merged);
    (read != normalized).then_some(read)
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// `%HH` of an unreserved character decoded, any other in upper case; `\` as `/`.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape(i));
                };
                let b = (hi << 4) | lo;
                if b == 0 {
                    return Err(PathError::Nul);
                }
                if unreserved(b) {
                    out.push(char::from(b));
                } else {
                    out.push('%');
                    out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                    out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                }
                i += 3;
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            _ => {
                // Copy up to the next byte that needs a look; it is ASCII, so the
                // slice ends on a character boundary.
                let end = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b'%' | b'\\'))
                    .map_or(bytes.len(), |p| i + p);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

/// `%2F` and `%5C` (upper case: the path is normalized) as `/`.
fn decode_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3).unwrap_or(&rest[at..]);
        if escape == "%2F" || escape == "%5C" {
            out.push('/');
        } else {
            out.push_str(escape);
        }
        rest = &rest[at + escape.len()..];
    }
    out.push_str(rest);
    out
}

/// RFC 3986 §5.2.4 on an absolute path: `.` segments go, `..` takes the segment
/// before it with it (never above the root), and a path that ended in one keeps its
/// trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        if i == last && (*s == "." || *s == "..") {
            out.push("");
        }
    }
    let mut read = String::with_capacity(path.len());
    for s in &out {
        read.push('/');
        read.push_str(s);
    }
    if read.is_empty() {
        read.push('/');
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn dot_segments_resolve_as_rfc_3986_says() {
        // RFC 3986 §5.4's examples that are absolute paths, and the edges.
        for (from, to) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a//../b", "/a/b"),
            ("/public/../admin/users", "/admin/users"),
            ("/public/./data/abc/../xyz", "/public/data/xyz"),
            ("/a/.b/..c/", "/a/.b/..c/"),
        ] {
            assert_eq!(norm(from), to, "{from}");
        }
    }

    #[test]
    fn unreserved_escapes_decode_others_keep_and_upper_case() {
        for (from, to) in [
            ("/%61dmin/users", "/admin/users"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2e/admin", "/admin"),
            ("/a%7euser/%5f%2D", "/a~user/_-"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%20b%3f", "/a%20b%3F"),
            ("/%252e%252e/x", "/%252e%252e/x"),
            ("/some\\data", "/some/data"),
            ("/a\\..\\b", "/b"),
        ] {
            assert_eq!(norm(from), to, "{from}");
        }
    }

    #[test]
    fn a_normal_path_is_borrowed_and_normalizing_twice_changes_nothing() {
        for p in ["/", "/admin/users", "/a.b/c..d/", "/echo.Echo/Get", "*"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        for p in [
            "/x/%2e%2e/%2e%2e/y",
            "/a/%2E/b/%2e%2E/c",
            "/%2561",
            "/a\\b/../c",
            "/a/%7E/./",
        ] {
            let once = norm(p);
            assert_eq!(norm(&once), once, "{p}");
        }
    }

    #[test]
    fn malformed_escapes_and_nul_are_refused() {
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%00b"), Err(PathError::Nul));
    }

    #[test]
    fn the_lenient_reading_decodes_slashes_merges_them_and_drops_parameters() {
        for (from, to) in [
            ("//admin/users", Some("/admin/users")),
            ("/admin%2Fusers", Some("/admin/users")),
            ("/admin%5Cusers", Some("/admin/users")),
            ("/admin;jsessionid=1/users", Some("/admin/users")),
            ("/public/..%2Fadmin", Some("/admin")),
            ("/public%2F..%2F..%2Fadmin/", Some("/admin/")),
            ("/a/b/", None),
            ("/a%20b", None),
            ("/", None),
            ("/%2F", Some("/")),
        ] {
            assert_eq!(lenient(from).as_deref(), to, "{from}");
        }
    }
}
