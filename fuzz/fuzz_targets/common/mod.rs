//! One sandbox's network as the engine builds it: an allow-list, a secret for `api.test`, an
//! interception CA and rules that block, set and delete headers, rewrite paths and queries.
//! No name server is configured: nothing a target does leaves the process.

use std::sync::Arc;

use matchlock_api::config::{HookRule, Interception, RuleAction, Secret};
use matchlock_net::{hooks::Hooks, CertAuthority, Flows, Options, Policy};

/// The flow handler every network target drives.
pub fn flows() -> Flows {
    let secret = Secret::new("API_KEY", "real-secret-value", vec!["api.test".into()]);
    let rules = vec![
        HookRule { name: "no-admin".into(), action: RuleAction::Block, path: "/admin*".into(), ..HookRule::default() },
        HookRule {
            name: "headers".into(),
            hosts: vec!["*.allowed.test".into()],
            set_headers: [("x-added".to_owned(), "1".to_owned())].into(),
            delete_headers: vec!["cookie".into()],
            set_query: [("q".to_owned(), "v".to_owned())].into(),
            delete_query: vec!["drop".into()],
            rewrite_path: "/rewritten".into(),
            ..HookRule::default()
        },
    ];
    let hooks = Hooks::new(Some(&Interception { rules, callback_socket: None })).expect("valid rules");
    Flows::new(Options {
        policy: Arc::new(Policy::new(vec!["*.allowed.test".into()], true, vec![secret])),
        intercept: true,
        ca: Some(Arc::new(CertAuthority::generate().expect("a CA"))),
        dns_servers: Vec::new(),
        mtu: 1500,
        gateway_mac: [0x02, 0, 0, 0, 0, 1],
        upstream_tls: Arc::new(matchlock_net::upstream_tls_config(None).expect("TLS config")),
        hooks,
        events: None,
        audit: None,
        budget: Arc::default(),
        audit_bodies: 0,
    })
}

/// A single-threaded runtime with time and I/O.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}
