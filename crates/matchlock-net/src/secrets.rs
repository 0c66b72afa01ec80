//! Secret substitution: placeholders out, real values in, only towards the secret's hosts.
//!
//! Requests: in header values and the query string, a placeholder becomes the real value when
//! the request's decided destination is one of the secret's hosts; a placeholder anywhere in
//! the headers or URL of a request to any other host blocks the request. Everything a secret's
//! hosts send back (headers, body, trailers, WebSocket messages) is scrubbed (value →
//! placeholder) so an echoing server cannot hand the value to the guest.

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Uri};
pub use matchlock_api::config::Secret;

use crate::policy::{glob_matches, Blocked};

fn for_host(secret: &Secret, host: &str) -> bool {
    secret.hosts.is_empty() || secret.hosts.iter().any(|p| glob_matches(p, host))
}

/// The secrets whose values may be sent to `host`: exactly those a response from it may carry
/// back, so exactly those its responses are scrubbed of.
pub fn for_destination<'a>(host: &str, secrets: &'a [Secret]) -> Vec<&'a Secret> {
    secrets.iter().filter(|s| for_host(s, host)).collect()
}

/// Replaces or polices placeholders in a request to `host`. Returns the secrets that were
/// substituted (their values must be scrubbed from the response).
pub fn apply_to_request<'a>(parts: &mut Parts, host: &str, secrets: &'a [Secret]) -> Result<Vec<&'a Secret>, Blocked> {
    let mut injected = Vec::new();
    for secret in secrets {
        let placeholder = secret.placeholder.as_bytes();
        if for_host(secret, host) {
            let mut used = false;
            for value in parts.headers.values_mut() {
                if let Some(replaced) = replace_all(value.as_bytes(), placeholder, secret.value.as_bytes()) {
                    if let Ok(v) = HeaderValue::from_bytes(&replaced) {
                        *value = v;
                        used = true;
                    }
                }
            }
            if let Some(query) = parts.uri.query() {
                if let Some(replaced) = replace_all(query.as_bytes(), placeholder, secret.value.as_bytes()) {
                    let replaced = String::from_utf8_lossy(&replaced).into_owned();
                    parts.uri = with_query(&parts.uri, &replaced).ok_or(Blocked::SecretToUnauthorizedHost)?;
                    used = true;
                }
            }
            if used {
                injected.push(secret);
            }
        } else {
            let in_headers = parts.headers.values().any(|v| contains(v.as_bytes(), placeholder));
            if in_headers || contains(parts.uri.to_string().as_bytes(), placeholder) {
                return Err(Blocked::SecretToUnauthorizedHost);
            }
        }
    }
    Ok(injected)
}

fn with_query(uri: &Uri, query: &str) -> Option<Uri> {
    let mut builder = Uri::builder();
    if let Some(scheme) = uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = uri.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.path_and_query(format!("{}?{query}", uri.path())).build().ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// `haystack` with every `needle` replaced, or `None` if there was none.
pub fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    if !contains(haystack, needle) {
        return None;
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The scrubber of a response stream from one of the secrets' hosts: values become placeholders
/// in the body (across chunk boundaries) and in trailers.
///
/// All values are matched at once, leftmost-longest, on the upstream's bytes: a value that
/// contains another is replaced whole (replacing the shorter one first would hand the guest
/// the rest of the longer one), and a placeholder is never scanned again. Each value is
/// looked for in the [`forms`] an echoing server most easily hands back: as is, hex and
/// base64, all without regard to case.
#[derive(Debug)]
pub struct Scrubber {
    /// The forms of the values, lowercased (matched without case).
    patterns: Vec<Vec<u8>>,
    values: AhoCorasick,
    placeholders: Vec<Vec<u8>>,
    /// The longest value, less one: how much of a chunk's tail can still start a match.
    hold_back: usize,
    /// Upstream bytes not released yet.
    pending: BytesMut,
}

impl Scrubber {
    /// Scrubs the values of `secrets` (empty values are ignored).
    pub fn new(secrets: &[&Secret]) -> Self {
        let mut patterns = Vec::new();
        let mut placeholders = Vec::new();
        for secret in secrets.iter().filter(|s| !s.value.is_empty()) {
            for form in forms(secret.value.as_bytes()) {
                patterns.push(form);
                placeholders.push(secret.placeholder.as_bytes().to_vec());
            }
        }
        let values = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .ascii_case_insensitive(true)
            .build(&patterns)
            .expect("literal patterns always build");
        Self {
            values,
            placeholders,
            hold_back: patterns.iter().map(|v| v.len() - 1).max().unwrap_or(0),
            patterns,
            pending: BytesMut::new(),
        }
    }

    /// Scrubs response headers or trailers: in values, secret values become placeholders; a
    /// header whose name carries a value (names arrive lowercased, so compared without case)
    /// is dropped.
    pub fn scrub_headers(&self, headers: &mut HeaderMap) {
        let carrying: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.patterns.iter().any(|v| contains(name.as_str().as_bytes(), v)))
            .cloned()
            .collect();
        for name in carrying {
            headers.remove(name);
        }
        for value in headers.values_mut() {
            if self.values.is_match(value.as_bytes()) {
                *value = HeaderValue::from_bytes(&self.scrub(value.as_bytes())).unwrap_or(HeaderValue::from_static(""));
            }
        }
    }

    /// One whole message scrubbed (a WebSocket message, a header value).
    pub fn scrub(&self, data: &[u8]) -> Vec<u8> {
        self.values.replace_all_bytes(data, &self.placeholders)
    }
}

/// Values shorter than this are only looked for as they are: their encodings would be short
/// enough to occur by chance.
const MIN_ENCODED: usize = 6;

/// The forms of `value` a response is scrubbed of, lowercased (matched without case): the
/// value itself, its hex, and its base64 in the standard and URL-safe alphabets at each of
/// the three alignments it can have inside a longer encoded text (cut to the characters the
/// value alone decides). Other encodings (a value split in pieces, reversed, encrypted …)
/// cannot be recognised; the pieces a `Range` would ask for are refused in `http::forward`.
fn forms(value: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let mut forms = vec![value.to_ascii_lowercase()];
    if value.len() >= MIN_ENCODED {
        forms.push(value.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes());
        for engine in
            [base64::engine::general_purpose::STANDARD_NO_PAD, base64::engine::general_purpose::URL_SAFE_NO_PAD]
        {
            for shift in 0..3 {
                let mut shifted = vec![0u8; shift];
                shifted.extend_from_slice(value);
                let text = engine.encode(&shifted);
                // Characters 0..2 (or 0..3) also carry the bits of what came before.
                let start = [0, 2, 3][shift];
                let end = shifted.len() * 8 / 6;
                forms.push(text.as_bytes()[start..end].to_ascii_lowercase());
            }
        }
    }
    forms.sort();
    forms.dedup();
    forms
}

impl BodyTransform for Scrubber {
    fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        // Held back: the tail from the first position where the bytes so far could still
        // become a value (only the last `hold_back` positions can). A match starting before
        // that point is final: every value starting there is decided.
        let len = self.pending.len();
        let open = (len.saturating_sub(self.hold_back)..len)
            .find(|&p| {
                self.patterns.iter().any(|v| v.len() > len - p && v[..len - p].eq_ignore_ascii_case(&self.pending[p..]))
            })
            .unwrap_or(len);
        let mut out = Vec::with_capacity(len);
        let mut done = 0;
        for m in self.values.find_iter(&self.pending[..]) {
            if m.start() >= open {
                break;
            }
            out.extend_from_slice(&self.pending[done..m.start()]);
            out.extend_from_slice(&self.placeholders[m.pattern().as_usize()]);
            done = m.end();
        }
        let cut = open.max(done);
        out.extend_from_slice(&self.pending[done..cut]);
        let _ = self.pending.split_to(cut);
        Bytes::from(out)
    }

    fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        Bytes::from(self.scrub(&rest))
    }

    fn trailers(&mut self, trailers: &mut HeaderMap) {
        self.scrub_headers(trailers);
    }
}

/// A streaming rewrite of a body: chunks in, bytes out, the rest at the end.
pub trait BodyTransform: Send + Sync {
    /// Feeds a chunk; returns what can be released now.
    fn push(&mut self, chunk: &[u8]) -> Bytes;
    /// Releases whatever is held back at the end of the stream.
    fn finish(&mut self) -> Bytes;
    /// Rewrites the trailers (after `finish`); unchanged by default.
    fn trailers(&mut self, _trailers: &mut HeaderMap) {}
}

/// Interception rules' literal body replacements: each `find` (non-empty) replaced everywhere
/// by its `replace`, one pair after the other (the original's semantics).
#[derive(Debug, Default)]
pub struct Replacements {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Replacements {
    /// The pairs, applied in order.
    pub fn new(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self { pairs: pairs.into_iter().filter(|(f, _)| !f.is_empty()).collect() }
    }

    /// `data` with every pair replaced.
    pub fn apply(&self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        for (find, replace) in &self.pairs {
            if let Some(r) = replace_all(&out, find, replace) {
                out = r;
            }
        }
        out
    }
}

/// Server-sent events: replacements apply to the payload of each `data:` line, released line
/// by line (events keep streaming), line endings kept.
#[derive(Debug)]
pub struct SseDataReplacer {
    replacements: Replacements,
    line: Vec<u8>,
}

impl SseDataReplacer {
    /// Applies `pairs` to every `data:` payload.
    pub fn new(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self { replacements: Replacements::new(pairs), line: Vec::new() }
    }

    fn line_out(&self, line: &[u8]) -> Vec<u8> {
        match line.strip_prefix(b"data:") {
            Some(payload) => {
                let body_end = payload.iter().rposition(|&b| b != b'\n' && b != b'\r').map_or(0, |i| i + 1);
                let mut out = b"data:".to_vec();
                out.extend_from_slice(&self.replacements.apply(&payload[..body_end]));
                out.extend_from_slice(&payload[body_end..]);
                out
            }
            None => line.to_vec(),
        }
    }
}

impl BodyTransform for SseDataReplacer {
    fn push(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = Vec::new();
        for &b in chunk {
            self.line.push(b);
            if b == b'\n' {
                out.extend_from_slice(&self.line_out(&self.line));
                self.line.clear();
            }
        }
        Bytes::from(out)
    }

    fn finish(&mut self) -> Bytes {
        let out = self.line_out(&self.line);
        self.line.clear();
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("KEY", "real-value", vec!["api.test".into()])
    }

    fn request(uri: &str, header: &str) -> Parts {
        http::Request::builder().uri(uri).header("authorization", header).body(()).unwrap().into_parts().0
    }

    #[test]
    fn substitutes_in_headers_and_query_for_the_secret_host() {
        let s = secret();
        let p = &s.placeholder;
        let mut parts = request(&format!("/x/{p}?key={p}&a=1"), &format!("Bearer {p}"));
        let injected = apply_to_request(&mut parts, "api.test", std::slice::from_ref(&s)).unwrap();
        assert_eq!(injected.len(), 1);
        assert_eq!(parts.headers["authorization"], "Bearer real-value");
        assert_eq!(parts.uri.query(), Some("key=real-value&a=1"));
        assert_eq!(parts.uri.path(), format!("/x/{p}"), "the path is left alone");
    }

    #[test]
    fn blocks_placeholders_to_other_hosts() {
        let s = secret();
        let mut parts = request("/", &format!("Bearer {}", s.placeholder));
        assert_eq!(
            apply_to_request(&mut parts, "evil.test", std::slice::from_ref(&s)).unwrap_err(),
            Blocked::SecretToUnauthorizedHost
        );
        let mut parts = request(&format!("/?q={}", s.placeholder), "none");
        assert!(apply_to_request(&mut parts, "evil.test", std::slice::from_ref(&s)).is_err());
        let mut parts = request("/", "none");
        assert!(apply_to_request(&mut parts, "evil.test", std::slice::from_ref(&s)).unwrap().is_empty());
    }

    #[test]
    fn scrubbing_covers_header_values_names_and_trailers() {
        let s = Secret::new("KEY", "Real-Value", vec!["api.test".into()]);
        let mut headers = HeaderMap::new();
        headers.insert("x-echo", HeaderValue::from_static("Bearer Real-Value"));
        headers.insert("x-real-value", HeaderValue::from_static("1"));
        headers.insert("x-other", HeaderValue::from_static("fine"));
        Scrubber::new(&[&s]).scrub_headers(&mut headers);
        assert_eq!(headers["x-echo"], format!("Bearer {}", s.placeholder).as_str());
        assert!(!headers.contains_key("x-real-value"), "a name carrying the value is dropped");
        assert_eq!(headers["x-other"], "fine");
        let mut scrubber = Scrubber::new(&[&s]);
        let mut body = scrubber.push(b"a Real-").to_vec();
        body.extend_from_slice(&scrubber.push(b"Value b"));
        body.extend_from_slice(&scrubber.finish());
        assert_eq!(body, format!("a {} b", s.placeholder).as_bytes());
        let mut trailers = HeaderMap::new();
        trailers.insert("x-trailer", HeaderValue::from_static("Real-Value"));
        scrubber.trailers(&mut trailers);
        assert_eq!(trailers["x-trailer"], s.placeholder.as_str());
        assert_eq!(for_destination("api.test", std::slice::from_ref(&s)).len(), 1);
        assert!(for_destination("evil.test", std::slice::from_ref(&s)).is_empty());
    }

    #[test]
    fn sse_replacements_apply_to_data_lines_only() {
        let mut r = SseDataReplacer::new(vec![(b"secret".to_vec(), b"[x]".to_vec())]);
        let mut out = r.push(b"event: secret\ndata: a secret\r\n\ndata: sec").to_vec();
        assert_eq!(out, b"event: secret\ndata: a [x]\r\n\n", "complete lines are released at once");
        out.extend_from_slice(&r.push(b"ret\n"));
        out.extend_from_slice(&r.finish());
        assert!(out.ends_with(b"data: [x]\n"), "{:?}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn scrubber_catches_values_split_across_chunks() {
        let s = Secret::new("KEY", "real-value", vec!["api.test".into()]);
        let mut r = Scrubber::new(&[&s]);
        let mut out = Vec::new();
        for chunk in [&b"abc real-"[..], b"val", b"ue def real", b"-valu", b"e"] {
            out.extend_from_slice(&r.push(chunk));
        }
        out.extend_from_slice(&r.finish());
        assert_eq!(out, format!("abc {p} def {p}", p = s.placeholder).as_bytes());
        let released = r.push(b"hello world");
        assert_eq!(&released, &b"hello world"[..], "nothing held back without a partial match");
        assert_eq!(&r.push(b" and real"), &b" and "[..], "a tail that may become a value is held back");
    }

    #[test]
    fn transformed_values_are_scrubbed_also_across_chunks() {
        use base64::Engine as _;
        let s = Secret::new("KEY", "sk-Live-7fQ2-token", vec!["api.test".into()]);
        let value = s.value.as_bytes();
        let mut echoed = vec![value.to_ascii_uppercase(), value.to_ascii_lowercase()];
        echoed.push(value.iter().map(|b| format!("{b:02X}")).collect::<String>().into_bytes());
        for prefix in [&b""[..], b"x", b"xy"] {
            let raw = [prefix, value].concat();
            echoed.push(base64::engine::general_purpose::STANDARD.encode(&raw).into_bytes());
            echoed.push(base64::engine::general_purpose::URL_SAFE.encode(&raw).into_bytes());
        }
        let body = echoed.join(&b"\n"[..]);
        let whole = Scrubber::new(&[&s]).scrub(&body);
        assert_eq!(String::from_utf8_lossy(&whole).matches(s.placeholder.as_str()).count(), echoed.len());
        for cut in 1..body.len() {
            let mut r = Scrubber::new(&[&s]);
            let mut out = r.push(&body[..cut]).to_vec();
            out.extend_from_slice(&r.push(&body[cut..]));
            out.extend_from_slice(&r.finish());
            assert_eq!(out, whole, "cut at {cut}");
        }
        // Positive control: text that merely resembles it passes untouched.
        assert_eq!(Scrubber::new(&[&s]).scrub(b"sk-Live-7fQ2 tok en"), b"sk-Live-7fQ2 tok en");
    }

    /// Found by the `scrub_stream` fuzz target: with one value inside another, replacing the
    /// shorter first left the rest of the longer one for the guest to read.
    #[test]
    fn a_value_inside_another_never_reveals_the_longer_one() {
        let long = Secret::new("LONG", "qjgyimmmogg", vec!["api.test".into()]);
        let short = Secret::new("SHORT", "m", vec!["api.test".into()]);
        for order in [[&short, &long], [&long, &short]] {
            let whole = Scrubber::new(&order).scrub(b"<qjgyimmmogg>");
            assert_eq!(whole, format!("<{}>", long.placeholder).as_bytes());
            let mut streamed = Scrubber::new(&order);
            let mut out = streamed.push(b"<qjgyimm").to_vec();
            out.extend_from_slice(&streamed.push(b"mogg>"));
            out.extend_from_slice(&streamed.finish());
            assert_eq!(out, whole, "streaming gives the same answer as the whole body");
        }
        let mut headers = HeaderMap::new();
        headers.insert("x-echo", HeaderValue::from_static("qjgyimmmogg m"));
        Scrubber::new(&[&short, &long]).scrub_headers(&mut headers);
        assert_eq!(headers["x-echo"], format!("{} {}", long.placeholder, short.placeholder).as_str());
    }
}
