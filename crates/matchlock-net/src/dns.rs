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
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
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

    /// Asks the servers one question with a query built here (a fresh id, nothing else of
    /// whoever asked), and returns the answer if it answers exactly that question.
    pub async fn ask(&self, question: &Query, recursion_desired: bool) -> Result<Message, DnsError> {
        let mut message = Message::new();
        message
            .set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(recursion_desired)
            .add_query(question.clone());
        let query = message.to_vec().map_err(|_| DnsError::BadName(question.name().to_utf8()))?;
        let answer = Message::from_vec(&self.exchange(&query).await?).map_err(|_| DnsError::NoAnswer)?;
        if answer.message_type() != MessageType::Response || answer.queries() != [question.clone()] {
            return Err(DnsError::NoAnswer);
        }
        Ok(answer)
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
        let mut fqdn = Name::from_utf8(name).map_err(|_| DnsError::BadName(name.to_owned()))?;
        // The answer's question is absolute; so must the asked one be to match it.
        fqdn.set_fqdn(true);
        let answer = self.ask(&Query::query(fqdn, RecordType::A), true).await?;
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
///
/// Only a standard query with exactly one question of class IN is answered; anything else is
/// refused. The guest's message is never forwarded: the host asks its servers the checked
/// question with a query of its own ([`Resolver::ask`]) and builds the guest's answer from the
/// parsed records (no flag, extra record or EDNS option of the guest reaches a server).
pub async fn answer_guest(
    query: &[u8],
    resolver: &Resolver,
    policy: Option<&Policy>,
    audit: Option<&crate::audit::Audit>,
) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let started = crate::audit::now_ms();
    let record = |name: &str, query_type: String, code: ResponseCode| {
        let Some(audit) = audit else { return };
        let refused = code == ResponseCode::Refused;
        audit.record(matchlock_api::audit::Record {
            time_ms: started,
            kind: matchlock_api::audit::Kind::Dns,
            host: name.chars().take(255).collect(),
            query_type,
            answer: rcode_name(code),
            duration_ms: crate::audit::now_ms().saturating_sub(started),
            decision: if refused && policy.is_some() {
                matchlock_api::audit::Decision::Blocked
            } else {
                matchlock_api::audit::Decision::Allowed
            },
            ..Default::default()
        });
    };
    let question = match single_question(&request) {
        Some(question) => question,
        None => {
            record("", String::new(), ResponseCode::Refused);
            return error_response(&request, ResponseCode::Refused);
        }
    };
    let name = question.name().to_utf8();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let query_type = question.query_type().to_string();
    if policy.is_some_and(|policy| !policy.name_resolvable(name)) {
        record(name, query_type, ResponseCode::Refused);
        return error_response(&request, ResponseCode::Refused);
    }
    let Ok(upstream) = resolver.ask(question, request.recursion_desired()).await else {
        record(name, query_type, ResponseCode::ServFail);
        return error_response(&request, ResponseCode::ServFail);
    };
    record(name, query_type, upstream.response_code());
    if let Some(policy) = policy {
        for ip in a_records(&upstream).0 {
            policy.remember_answer(ip, name);
        }
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(upstream.recursion_available())
        .set_authoritative(upstream.authoritative())
        .set_truncated(upstream.truncated())
        .set_response_code(upstream.response_code())
        .add_query(question.clone())
        .add_answers(upstream.answers().iter().cloned())
        .add_name_servers(upstream.name_servers().iter().cloned());
    response.to_vec().ok()
}

/// A `REFUSED` answer to `query` and the name it asked for (`None`: not a query).
pub fn refuse(query: &[u8]) -> Option<(Vec<u8>, String)> {
    let request = Message::from_vec(query).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let name = request.queries().first().map(|q| q.name().to_utf8()).unwrap_or_default();
    let name = name.strip_suffix('.').unwrap_or(&name).chars().take(255).collect();
    Some((error_response(&request, ResponseCode::Refused)?, name))
}

/// The mnemonic of a DNS response code (RFC 1035, 2136), as `dig` prints it.
fn rcode_name(code: ResponseCode) -> String {
    match u16::from(code) {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        other => format!("RCODE{other}"),
    }
}

/// The query's one question, if it is a standard query of exactly one class-IN question that
/// is not a zone transfer.
fn single_question(request: &Message) -> Option<&Query> {
    if request.op_code() != OpCode::Query {
        return None;
    }
    let [question] = request.queries() else { return None };
    let transfer = matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR);
    (question.query_class() == DNSClass::IN && !transfer).then_some(question)
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
        let answer = answer_guest(&query("exfil-data.evil.test"), &resolver, Some(&policy), None).await.unwrap();
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.response_code(), ResponseCode::Refused);
        assert_eq!(answer.id(), 7);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(answer_guest(b"\x00\x01garbage", &resolver, Some(&policy), None).await.is_none());
    }

    /// A real name server on loopback that records every query it receives and answers each
    /// with one A record for its question.
    async fn recording_server() -> (SocketAddr, std::sync::Arc<Mutex<Vec<Vec<u8>>>>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                log.lock().unwrap().push(buf[..n].to_vec());
                let query = Message::from_vec(&buf[..n]).unwrap();
                let mut answer = Message::new();
                answer.set_id(query.id()).set_message_type(MessageType::Response).add_queries(query.queries().to_vec());
                let name = query.queries()[0].name().clone();
                answer.add_answer(hickory_proto::rr::Record::from_rdata(
                    name,
                    30,
                    RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(198, 51, 100, 10))),
                ));
                socket.send_to(&answer.to_vec().unwrap(), peer).await.unwrap();
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn host_lookups_of_names_are_answered() {
        let (server, seen) = recording_server().await;
        let resolver = Resolver { servers: vec![server], cache: Mutex::default() };
        for name in ["api.test", "other.test."] {
            assert_eq!(resolver.lookup_ipv4(name).await.unwrap(), [Ipv4Addr::new(198, 51, 100, 10)], "{name}");
        }
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn only_one_checked_question_is_asked_and_nothing_of_the_guest_is_forwarded() {
        let (server, seen) = recording_server().await;
        let resolver = Resolver { servers: vec![server], cache: Mutex::default() };
        let policy = Policy::new(vec!["api.test".into()], true, vec![]);

        // Positive control: a plain query is answered through the server.
        let answer = answer_guest(&query("api.test"), &resolver, Some(&policy), None).await.unwrap();
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!((answer.id(), answer.response_code(), answer.answers().len()), (7, ResponseCode::NoError, 1));
        assert_eq!(seen.lock().unwrap().len(), 1);

        // Smuggling a second name behind an allowed one: refused, the server asked nothing.
        let mut two = Message::new();
        two.set_id(8)
            .add_query(Query::query(Name::from_utf8("api.test").unwrap(), RecordType::A))
            .add_query(Query::query(Name::from_utf8("exfil-DATA.evil.test").unwrap(), RecordType::A));
        let answer =
            Message::from_vec(&answer_guest(&two.to_vec().unwrap(), &resolver, Some(&policy), None).await.unwrap())
                .unwrap();
        assert_eq!(answer.response_code(), ResponseCode::Refused);
        // Another class, a zone transfer, and no question at all: refused too.
        let mut chaos = Query::query(Name::from_utf8("api.test").unwrap(), RecordType::TXT);
        chaos.set_query_class(DNSClass::CH);
        let axfr = Query::query(Name::from_utf8("api.test").unwrap(), RecordType::AXFR);
        for q in [Some(chaos), Some(axfr), None] {
            let mut m = Message::new();
            m.set_id(9);
            if let Some(q) = q {
                m.add_query(q);
            }
            let answer =
                Message::from_vec(&answer_guest(&m.to_vec().unwrap(), &resolver, Some(&policy), None).await.unwrap())
                    .unwrap();
            assert_eq!(answer.response_code(), ResponseCode::Refused);
        }
        assert_eq!(seen.lock().unwrap().len(), 1, "refused queries never reach the server");

        // Extra records, EDNS options and odd flags of the guest stay on the host: the server
        // receives a query of the host's own, with only the checked question.
        let mut crafted = Message::new();
        crafted
            .set_id(10)
            .set_checking_disabled(true)
            .set_authentic_data(true)
            .add_query(Query::query(Name::from_utf8("api.test").unwrap(), RecordType::A))
            .add_additional(hickory_proto::rr::Record::from_rdata(
                Name::from_utf8("exfil-EXTRA.evil.test").unwrap(),
                1,
                RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(1, 2, 3, 4))),
            ));
        let mut edns = hickory_proto::op::Edns::new();
        edns.options_mut().insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(65001, b"exfil-EDNS".to_vec()));
        crafted.set_edns(edns);
        let raw = crafted.to_vec().unwrap();
        let answer = Message::from_vec(&answer_guest(&raw, &resolver, Some(&policy), None).await.unwrap()).unwrap();
        assert_eq!((answer.id(), answer.answers().len()), (10, 1));
        let received = seen.lock().unwrap().last().unwrap().clone();
        assert!(!received.windows(5).any(|w| w == b"exfil"), "guest bytes reached the server");
        let received = Message::from_vec(&received).unwrap();
        assert_ne!(received.id(), 10, "the host picks its own id");
        let [question] = received.queries() else { panic!("one question: {received:?}") };
        assert_eq!((question.name().to_utf8().as_str(), question.query_type()), ("api.test.", RecordType::A));
        assert!(received.additionals().is_empty() && received.extensions().is_none());
        assert!(!received.checking_disabled() && !received.authentic_data());
    }
}
