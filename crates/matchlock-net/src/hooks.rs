//! Programmable interception: rules that block or rewrite requests (before phase) and
//! responses (after phase), statically or through a callback socket (reference §4).
//!
//! A callback is one JSON line each way over a fresh Unix-socket connection, bounded by the
//! rule's timeout; any callback failure leaves the request as it was (fail-open, as the
//! reference specifies). Callbacks see requests before secret substitution, so they only
//! ever see placeholders.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use matchlock_api::config::{path_matches, HookRule, Interception, RuleAction, RulePhase as Phase};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::policy::{glob_matches, Blocked};

/// Default callback timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest callback answer read.
const MAX_CALLBACK_REPLY: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    phase: Phase,
    block: bool,
    hosts: Vec<String>,
    methods: Vec<String>,
    path: String,
    callback_id: Option<String>,
    timeout: Duration,
    set_headers: Vec<(HeaderName, HeaderValue)>,
    delete_headers: Vec<HeaderName>,
    set_query: BTreeMap<String, String>,
    delete_query: Vec<String>,
    rewrite_path: Option<String>,
    set_response_headers: Vec<(HeaderName, HeaderValue)>,
    delete_response_headers: Vec<HeaderName>,
    body_replacements: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Errors in rule definitions.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// A field has a value the rules do not know.
    #[error("rule {rule:?}: invalid {field} {value:?}")]
    Invalid {
        /// The rule.
        rule: String,
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
}

/// The compiled rules of one sandbox.
#[derive(Debug, Default)]
pub struct Hooks {
    rules: Vec<Rule>,
    callback_socket: Option<PathBuf>,
}

fn headers(rule: &str, map: &BTreeMap<String, String>) -> Result<Vec<(HeaderName, HeaderValue)>, RuleError> {
    map.iter()
        .map(|(k, v)| {
            let bad = |field| RuleError::Invalid { rule: rule.to_owned(), field, value: k.clone() };
            Ok((
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad("header"))?,
                HeaderValue::from_str(v).map_err(|_| bad("header value"))?,
            ))
        })
        .collect()
}

fn names(rule: &str, list: &[String]) -> Result<Vec<HeaderName>, RuleError> {
    list.iter()
        .map(|k| {
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| RuleError::Invalid {
                rule: rule.to_owned(),
                field: "header",
                value: k.clone(),
            })
        })
        .collect()
}

impl Hooks {
    /// Compiles the rules: `allow` with mutations becomes `mutate`; rules that neither block,
    /// mutate nor call back are dropped.
    pub fn new(config: Option<&Interception>) -> Result<Self, RuleError> {
        let Some(config) = config else { return Ok(Self::default()) };
        let mut rules = Vec::new();
        for r in &config.rules {
            let rule = compile(r, r.phase, r.action == RuleAction::Block)?;
            let mutates = !rule.set_headers.is_empty()
                || !rule.delete_headers.is_empty()
                || !rule.set_query.is_empty()
                || !rule.delete_query.is_empty()
                || rule.rewrite_path.is_some()
                || !rule.set_response_headers.is_empty()
                || !rule.delete_response_headers.is_empty()
                || !rule.body_replacements.is_empty();
            if rule.block || mutates || rule.callback_id.is_some() {
                rules.push(rule);
            }
        }
        Ok(Self { rules, callback_socket: config.callback_socket.as_ref().map(PathBuf::from) })
    }

    fn matching<'a>(&'a self, phase: Phase, request: &'a RequestInfo) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| {
            r.phase == phase
                && (r.hosts.is_empty() || r.hosts.iter().any(|h| glob_matches(h, &request.host)))
                && (r.methods.is_empty() || r.methods.contains(&request.method))
                && (r.path.is_empty() || path_matches(&r.path, &request.path))
        })
    }

    /// Before phase: may block the request or rewrite its headers, query and path.
    pub async fn before(&self, host: &str, parts: &mut http::request::Parts) -> Result<(), Blocked> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let info =
            RequestInfo { host: host.to_owned(), method: parts.method.to_string(), path: parts.uri.path().to_owned() };
        for rule in self.matching(Phase::Before, &info) {
            if rule.block {
                return Err(Blocked::Rule(rule.name.clone()));
            }
            for (k, v) in &rule.set_headers {
                parts.headers.insert(k.clone(), v.clone());
            }
            for k in &rule.delete_headers {
                parts.headers.remove(k);
            }
            if !rule.set_query.is_empty() || !rule.delete_query.is_empty() {
                let mut query = parse_query(parts.uri.query().unwrap_or(""));
                query.retain(|(k, _)| !rule.delete_query.contains(k) && !rule.set_query.contains_key(k));
                query.extend(rule.set_query.iter().map(|(k, v)| (k.clone(), v.clone())));
                set_uri(parts, None, Some(&query));
            }
            if let Some(path) = &rule.rewrite_path {
                set_uri(parts, Some(path), None);
            }
            if let Some(id) = &rule.callback_id {
                let request = CallbackRequest {
                    callback_id: id,
                    phase: "before",
                    host,
                    method: &info.method,
                    path: parts.uri.path(),
                    query: parse_query(parts.uri.query().unwrap_or("")).into_iter().collect(),
                    request_headers: header_lists(&parts.headers),
                    status_code: 0,
                    response_headers: BTreeMap::new(),
                    is_sse: false,
                };
                let Some(reply) = self.call(rule, &request).await else { continue };
                if reply.action.as_deref() == Some("block") {
                    return Err(Blocked::Rule(rule.name.clone()));
                }
                if let Some(changes) = reply.request {
                    if let Some(new_headers) = changes.headers {
                        parts.headers = header_map(&new_headers);
                    }
                    if let Some(query) = changes.query {
                        set_uri(parts, None, Some(&query.into_iter().collect::<Vec<_>>()));
                    }
                    if let Some(path) = changes.path {
                        set_uri(parts, Some(&path), None);
                    }
                }
            }
        }
        Ok(())
    }

    /// After phase: may block the response, edit its headers, and ask for body changes.
    pub async fn after(
        &self,
        host: &str,
        method: &str,
        path: &str,
        request_headers: &HeaderMap,
        response: &mut http::response::Parts,
    ) -> Result<BodyChanges, Blocked> {
        let mut changes = BodyChanges::default();
        if self.rules.is_empty() {
            return Ok(changes);
        }
        let info = RequestInfo { host: host.to_owned(), method: method.to_owned(), path: path.to_owned() };
        let is_sse = is_event_stream(&response.headers);
        for rule in self.matching(Phase::After, &info) {
            if rule.block {
                return Err(Blocked::Rule(rule.name.clone()));
            }
            for (k, v) in &rule.set_response_headers {
                response.headers.insert(k.clone(), v.clone());
            }
            for k in &rule.delete_response_headers {
                response.headers.remove(k);
            }
            changes.replacements.extend(rule.body_replacements.iter().cloned());
            if let Some(id) = &rule.callback_id {
                let request = CallbackRequest {
                    callback_id: id,
                    phase: "after",
                    host,
                    method,
                    path,
                    query: BTreeMap::new(),
                    request_headers: header_lists(request_headers),
                    status_code: response.status.as_u16(),
                    response_headers: header_lists(&response.headers),
                    is_sse,
                };
                let Some(reply) = self.call(rule, &request).await else { continue };
                if reply.action.as_deref() == Some("block") {
                    return Err(Blocked::Rule(rule.name.clone()));
                }
                if let Some(edit) = reply.response {
                    if let Some(new_headers) = edit.headers {
                        response.headers = header_map(&new_headers);
                    }
                    if let Some(body) = edit.set_body_base64 {
                        use base64::Engine as _;
                        if let Ok(body) = base64::engine::general_purpose::STANDARD.decode(body) {
                            changes.body = Some(body);
                        }
                    }
                    changes.replacements.extend(
                        edit.body_replacements.into_iter().map(|r| (r.find.into_bytes(), r.replace.into_bytes())),
                    );
                }
            }
        }
        changes.replacements.retain(|(find, _)| !find.is_empty());
        Ok(changes)
    }

    async fn call(&self, rule: &Rule, request: &CallbackRequest<'_>) -> Option<CallbackReply> {
        let socket = self.callback_socket.as_ref()?;
        let exchange = async {
            let mut stream = tokio::net::UnixStream::connect(socket).await.ok()?;
            let mut line = serde_json::to_vec(request).ok()?;
            line.push(b'\n');
            stream.write_all(&line).await.ok()?;
            let mut reply = String::new();
            tokio::io::AsyncReadExt::take(BufReader::new(stream), MAX_CALLBACK_REPLY)
                .read_line(&mut reply)
                .await
                .ok()?;
            let reply: CallbackReply = serde_json::from_str(&reply).ok()?;
            reply.error.is_none().then_some(reply)
        };
        tokio::time::timeout(rule.timeout, exchange).await.ok().flatten()
    }
}

fn compile(r: &HookRule, phase: Phase, block: bool) -> Result<Rule, RuleError> {
    Ok(Rule {
        name: r.name.clone(),
        phase,
        block,
        hosts: r.hosts.clone(),
        methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        path: r.path.clone(),
        callback_id: (!r.callback_id.is_empty()).then(|| r.callback_id.clone()),
        timeout: if r.timeout_ms == 0 { DEFAULT_TIMEOUT } else { Duration::from_millis(r.timeout_ms) },
        set_headers: headers(&r.name, &r.set_headers)?,
        delete_headers: names(&r.name, &r.delete_headers)?,
        set_query: r.set_query.clone(),
        delete_query: r.delete_query.clone(),
        rewrite_path: (!r.rewrite_path.is_empty()).then(|| r.rewrite_path.clone()),
        set_response_headers: headers(&r.name, &r.set_response_headers)?,
        delete_response_headers: names(&r.name, &r.delete_response_headers)?,
        body_replacements: r
            .body_replacements
            .iter()
            .map(|b| (b.find.clone().into_bytes(), b.replace.clone().into_bytes()))
            .collect(),
    })
}

struct RequestInfo {
    host: String,
    method: String,
    path: String,
}

/// What the after phase wants done to the body.
#[derive(Debug, Default)]
pub struct BodyChanges {
    /// A whole new body.
    pub body: Option<Vec<u8>>,
    /// Literal replace-all pairs, in order.
    pub replacements: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Whether a response is a server-sent event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"))
}

#[derive(Serialize)]
struct CallbackRequest<'a> {
    callback_id: &'a str,
    phase: &'a str,
    host: &'a str,
    method: &'a str,
    path: &'a str,
    query: BTreeMap<String, String>,
    request_headers: BTreeMap<String, Vec<String>>,
    status_code: u16,
    response_headers: BTreeMap<String, Vec<String>>,
    is_sse: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CallbackReply {
    action: Option<String>,
    request: Option<RequestEdit>,
    response: Option<ResponseEdit>,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RequestEdit {
    headers: Option<BTreeMap<String, Vec<String>>>,
    query: Option<BTreeMap<String, String>>,
    path: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseEdit {
    headers: Option<BTreeMap<String, Vec<String>>>,
    body_replacements: Vec<matchlock_api::config::BodyReplacement>,
    set_body_base64: Option<String>,
}

/// Headers as `Canonical-Name: [values]`.
fn header_lists(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        out.entry(canonical(k.as_str())).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    out
}

fn header_map(lists: &BTreeMap<String, Vec<String>>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, values) in lists {
        let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else { continue };
        for v in values {
            if let Ok(v) = HeaderValue::from_str(v) {
                map.append(name.clone(), v);
            }
        }
    }
    map
}

/// `content-type` → `Content-Type` (Go's canonical MIME header key).
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).into_owned().collect()
}

fn set_uri(parts: &mut http::request::Parts, path: Option<&str>, query: Option<&[(String, String)]>) {
    let path = path.map_or_else(|| parts.uri.path().to_owned(), str::to_owned);
    let query = match query {
        Some(q) => form_urlencoded::Serializer::new(String::new()).extend_pairs(q).finish(),
        None => parts.uri.query().unwrap_or("").to_owned(),
    };
    let path_and_query = if query.is_empty() { path } else { format!("{path}?{query}") };
    let mut builder = http::Uri::builder();
    if let Some(scheme) = parts.uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = parts.uri.authority() {
        builder = builder.authority(authority.clone());
    }
    if let Ok(uri) = builder.path_and_query(path_and_query).build() {
        parts.uri = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_drops_inert_rules_and_rejects_bad_ones() {
        let inert = HookRule { name: "nothing".into(), ..HookRule::default() };
        let blocker = HookRule { name: "b".into(), action: RuleAction::Block, ..HookRule::default() };
        let hooks = Hooks::new(Some(&Interception { rules: vec![inert, blocker], callback_socket: None })).unwrap();
        assert_eq!(hooks.rules.len(), 1);
        // Phases and actions are checked once, where the configuration is read.
        let bad = serde_json::from_str::<HookRule>(r#"{"name": "x", "phase": "during"}"#).unwrap_err();
        assert!(bad.to_string().contains("unknown variant `during`"), "{bad}");
        let sdk_default: HookRule = serde_json::from_str(r#"{"name": "y", "phase": "", "action": ""}"#).unwrap();
        assert_eq!((sdk_default.phase, sdk_default.action), (Phase::Before, RuleAction::Allow));
        assert_eq!(canonical("x-api-KEY"), "X-Api-Key");
    }

    #[tokio::test]
    async fn before_rules_rewrite_and_block() {
        let rule = HookRule {
            name: "rewrite".into(),
            hosts: vec!["*.test".into()],
            methods: vec!["get".into()],
            set_headers: [("X-Added".into(), "1".into())].into(),
            delete_headers: vec!["X-Drop".into()],
            set_query: [("b".into(), "2".into())].into(),
            delete_query: vec!["a".into()],
            rewrite_path: "/new".into(),
            ..HookRule::default()
        };
        let block = HookRule {
            name: "no-admin".into(),
            action: RuleAction::Block,
            path: "/admin/*".into(),
            ..HookRule::default()
        };
        let hooks = Hooks::new(Some(&Interception { rules: vec![rule, block], callback_socket: None })).unwrap();
        let (mut parts, ()) =
            http::Request::builder().uri("/old?a=1&c=3").header("x-drop", "y").body(()).unwrap().into_parts();
        hooks.before("api.test", &mut parts).await.unwrap();
        assert_eq!(parts.uri.to_string(), "/new?c=3&b=2");
        assert_eq!(parts.headers["x-added"], "1");
        assert!(!parts.headers.contains_key("x-drop"));
        let (mut admin, ()) = http::Request::builder().uri("/admin/users").body(()).unwrap().into_parts();
        assert_eq!(hooks.before("api.test", &mut admin).await, Err(Blocked::Rule("no-admin".into())));
    }
}
