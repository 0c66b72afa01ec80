//! DNS: the guest's queries are answered by the host, through the sandbox's name servers.
//!
//! Under interception, names no allow-list pattern could reach are refused, so DNS cannot be
//! used to exfiltrate data through lookups of arbitrary names. The host's own lookups (for the
//! addresses it dials) use the same servers.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;

use crate::policy::Policy;

/// How long one server gets to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a host-side answer is reused.
const MAX_CACHE_TTL: Duration = Duration::from_secs(60);
/// Bound on cached host-side answers.
const MAX_CACHE_ENTRIES: usize = 1024;
/// Largest DNS message handled (TCP framing allows 64 KiB).
pub const MAX_MESSAGE: usize = 65_535;

/// Errors from upstream name servers.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// No server answered in time.
    #[error("no name server answered")]
    NoAnswer,
    /// The name does not resolve to an IPv4 address.
    #[error("{0} has no IPv4 address")]
    NoAddress(String),
    /// The name is not a valid DNS name.
    #[error("invalid name {0:?}")]
    BadName(String),
}

/// The sandbox's upstream name servers.
#[derive(Debug)]
pub struct Resolver {
    servers: Vec<SocketAddr>,
    cache: Mutex<HashMap<String, (Vec<Ipv4Addr>, Instant)>>,
}

impl Resolver {
    /// Resolver over `servers` (port 53).
    pub fn new(servers: &[std::net::IpAddr]) -> Self {
        Self { servers: servers.iter().map(|ip| SocketAddr::new(*ip, 53)).collect(), cache: Mutex::default() }
    }

    /// Sends a raw query to each server in turn until one answers it.
    pub async fn exchange(&self, query: &[u8]) -> Result<Vec<u8>, DnsError> {
        if query.len() < 2 {
            return Err(DnsError::NoAnswer);
        }
        for server in &self.servers {
            let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
            let Ok(socket) = UdpSocket::bind(bind).await else { continue };
            if socket.connect(server).await.is_err() || socket.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; MAX_MESSAGE];
            let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                if n >= 2 && buf[..2] == query[..2] {
                    buf.truncate(n);
                    return Ok(buf);
                }
            }
        }
        Err(DnsError::NoAnswer)
    }

    /// The IPv4 addresses of `name`, from the sandbox's servers (cached up to the TTL, ≤ 60 s).
    pub async fn lookup_ipv4(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        if let Ok(ip) = name.parse::<Ipv4Addr>() {
            return Ok(vec![ip]);
        }
        if let Some((ips, expiry)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            if *expiry > Instant::now() {
                return Ok(ips.clone());
            }
        }
        let fqdn = Name::from_utf8(name).map_err(|_| DnsError::BadName(name.to_owned()))?;
        let mut message = Message::new();
        message
            .set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(fqdn, RecordType::A));
        let query = message.to_vec().map_err(|_| DnsError::BadName(name.to_owned()))?;
        let answer = Message::from_vec(&self.exchange(&query).await?).map_err(|_| DnsError::NoAnswer)?;
        let (ips, ttl) = a_records(&answer);
        if ips.is_empty() {
            return Err(DnsError::NoAddress(name.to_owned()));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(name.to_owned(), (ips.clone(), Instant::now() + ttl.min(MAX_CACHE_TTL)));
        Ok(ips)
    }
}

/// IPv4 answers and the smallest TTL among them.
fn a_records(message: &Message) -> (Vec<Ipv4Addr>, Duration) {
    let mut ttl = MAX_CACHE_TTL;
    let ips = message
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            RData::A(a) => {
                ttl = ttl.min(Duration::from_secs(u64::from(record.ttl())));
                Some(a.0)
            }
            _ => None,
        })
        .collect();
    (ips, ttl)
}

/// Answers one query from the guest. `None` drops it (unparsable garbage).
pub async fn answer_guest(query: &[u8], resolver: &Resolver, policy: Option<&Policy>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let name = request.queries().first().map(|q| q.name().to_utf8());
    let name = name.as_deref().map(|n| n.strip_suffix('.').unwrap_or(n).to_owned());
    if let (Some(policy), Some(name)) = (policy, name.as_deref()) {
        if !policy.name_resolvable(name) {
            return error_response(&request, ResponseCode::Refused);
        }
    }
    let Ok(response) = resolver.exchange(query).await else {
        return error_response(&request, ResponseCode::ServFail);
    };
    if let (Some(policy), Some(name), Ok(parsed)) = (policy, name.as_deref(), Message::from_vec(&response)) {
        for ip in a_records(&parsed).0 {
            policy.remember_answer(ip, name);
        }
    }
    Some(response)
}

fn error_response(request: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut response = Message::error_msg(request.id(), request.op_code(), code);
    response.add_queries(request.queries().iter().cloned());
    response.set_recursion_desired(request.recursion_desired()).set_recursion_available(true);
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7).add_query(Query::query(Name::from_utf8(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[tokio::test]
    async fn names_outside_the_allow_list_are_refused_without_asking_upstream() {
        // The resolver points at a port nobody answers; a refusal must not wait for it.
        let resolver = Resolver::new(&["127.0.0.1".parse().unwrap()]);
        let policy = Policy::new(vec!["*.allowed.test".into()], true, vec![]);
        let started = Instant::now();
        let answer = answer_guest(&query("exfil-data.evil.test"), &resolver, Some(&policy)).await.unwrap();
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.response_code(), ResponseCode::Refused);
        assert_eq!(answer.id(), 7);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(answer_guest(b"\x00\x01garbage", &resolver, Some(&policy)).await.is_none());
    }
}
