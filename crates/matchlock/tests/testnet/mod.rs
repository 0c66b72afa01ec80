//! The test hosts of the network suites: a network namespace made by the tests, reached
//! through a veth pair, with a real DNS server (dnsmasq, logging every query it receives)
//! answering the test names, and HTTP, HTTPS (certificates from a test CA), TCP-echo,
//! UDP-echo and raw recording servers (tests/fixtures/nethost.py) plus an HTTP/2-only TLS
//! server. Nothing here reaches the internet: 198.51.100.0/24 is a documentation range routed
//! only to that namespace. Every server logs what it really received, which is what the
//! tests assert on (the guest's view can be scrubbed).
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{repo_root, Home};

pub(crate) const NAMESPACE: &str = "mltestnet";
pub(crate) const HOST_VETH: &str = "mltestnet0";
pub(crate) const DNS: &str = "198.51.100.53";
pub(crate) const API: &str = "198.51.100.10";
pub(crate) const OTHER: &str = "198.51.100.11";
pub(crate) const GLOB: &str = "198.51.100.12";
/// The HTTP/2-only TLS server (`h2.test`), inside the namespace.
pub(crate) const H2: &str = "198.51.100.13";
/// The host's own end of the veth: an address of the host, never reachable from a guest.
pub(crate) const HOST_SIDE: &str = "198.51.100.1";
/// A second namespace, like a Kubernetes pod's: its own address, routed to the test hosts
/// through a veth into theirs.
pub(crate) const POD_NAMESPACE: &str = "mltestpod";
/// The pod namespace's address (TEST-NET-3).
pub(crate) const POD_ADDRESS: &str = "203.0.113.2";

/// The test hosts; they live as long as the test process.
pub(crate) struct TestNet {
    /// Certificates and server logs: one fixed directory under cargo's temporary directory,
    /// replaced at each start as the namespace is (a static is never dropped, so a fresh
    /// temporary directory per run was left behind in /tmp every time).
    dir: PathBuf,
    _servers: Vec<Child>,
}

pub(crate) fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().expect("run command")
}

pub(crate) fn must(args: &[&str]) {
    let out = sh(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Starts a process in the test namespace that dies with this test process. The parent-death
/// signal follows the spawning *thread*, so the spawn happens on a thread that never ends.
fn spawn_in_namespace(args: &[&str], log: &Path) -> Child {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let log = log.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tx.send(spawn_here(&args, &log)).unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap()
}

fn spawn_here(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", NAMESPACE]).args(args).stdout(log.try_clone().unwrap()).stderr(log);
    // SAFETY: prctl is async-signal-safe; the server must not outlive the test process.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    cmd.spawn().expect("spawn in namespace")
}

pub(crate) fn testnet() -> &'static TestNet {
    static NET: OnceLock<TestNet> = OnceLock::new();
    NET.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("testnet");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.as_path();
        // A previous run (or bench/net, on the same range) may have left these.
        for (ns, veth) in [(NAMESPACE, HOST_VETH), ("mlbenchnet", "mlbenchnet0"), (POD_NAMESPACE, "")] {
            let _ = sh(&["ip", "netns", "del", ns]);
            if !veth.is_empty() {
                let _ = sh(&["ip", "link", "del", veth]);
            }
        }
        must(&["ip", "netns", "add", NAMESPACE]);
        must(&["ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", "eth0", "netns", NAMESPACE]);
        must(&["ip", "addr", "add", "198.51.100.1/24", "dev", HOST_VETH]);
        must(&["ip", "link", "set", HOST_VETH, "up"]);
        for ip in ["198.51.100.2", API, OTHER, GLOB, DNS, H2] {
            must(&["ip", "-n", NAMESPACE, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        }
        must(&["ip", "-n", NAMESPACE, "link", "set", "eth0", "up"]);
        must(&["ip", "-n", NAMESPACE, "link", "set", "lo", "up"]);
        must(&["ip", "netns", "add", POD_NAMESPACE]);
        must(&[
            "ip",
            "-n",
            NAMESPACE,
            "link",
            "add",
            "pod0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            POD_NAMESPACE,
        ]);
        must(&["ip", "-n", NAMESPACE, "addr", "add", "203.0.113.1/24", "dev", "pod0"]);
        must(&["ip", "-n", NAMESPACE, "link", "set", "pod0", "up"]);
        must(&["ip", "-n", POD_NAMESPACE, "addr", "add", &format!("{POD_ADDRESS}/24"), "dev", "eth0"]);
        must(&["ip", "-n", POD_NAMESPACE, "link", "set", "eth0", "up"]);
        must(&["ip", "-n", POD_NAMESPACE, "link", "set", "lo", "up"]);
        must(&["ip", "-n", POD_NAMESPACE, "route", "add", "default", "via", "203.0.113.1"]);
        // Test CA and a server certificate for every test name.
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:api.test,DNS:other.test,DNS:*.glob.test,DNS:evil.test,DNS:h2.test\n",
        )
        .unwrap();
        let p = |f: &str| d.join(f).to_string_lossy().into_owned();
        must(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
            "-days",
            "30",
            "-subj",
            "/CN=matchlock test CA",
        ]);
        must(&[
            "openssl",
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=api.test",
        ]);
        must(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.pem"),
            "-days",
            "30",
            "-extfile",
            &p("ext.cnf"),
        ]);
        let dns = spawn_in_namespace(
            &[
                "dnsmasq",
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--log-queries",
                "--log-facility=-",
                &format!("--listen-address={DNS}"),
                &format!("--address=/api.test/{API}"),
                &format!("--address=/other.test/{OTHER}"),
                &format!("--address=/glob.test/{GLOB}"),
                &format!("--address=/evil.test/{OTHER}"),
                &format!("--address=/h2.test/{H2}"),
                // The host's own address behind an allowed name.
                &format!("--address=/hostself.test/{HOST_SIDE}"),
                // DNS rebinding: allowed names that resolve to addresses the guest must not reach.
                "--address=/rebind.test/127.0.0.1",
                "--address=/metadata.test/169.254.169.254",
            ],
            &d.join("dnsmasq.log"),
        );
        let servers = spawn_in_namespace(
            &[
                "python3",
                &repo_root().join("tests/fixtures/nethost.py").to_string_lossy(),
                "--ips",
                &format!("{API},{OTHER},{GLOB}"),
                "--cert",
                &p("server.pem"),
                "--key",
                &p("server.key"),
                "--log",
                &p("requests.log"),
            ],
            &d.join("nethost.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        // dnsmasq says "started" once it listens; the first host-side lookup may come at once.
        let ready = |log: &str, word: &str| std::fs::read_to_string(d.join(log)).unwrap_or_default().contains(word);
        while !ready("nethost.log", "ready") || !ready("dnsmasq.log", "started") {
            assert!(Instant::now() < deadline, "test hosts did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        start_h2_server(&d.join("server.pem"), &d.join("server.key"));
        TestNet { dir, _servers: vec![dns, servers] }
    })
}

/// An HTTP/2-only TLS server (hyper) inside the namespace, [`H2`]:443, as `h2.test`: it
/// answers with the protocol, authority and path it received. The listening socket is made on
/// a thread that entered the namespace (sockets stay in the namespace they were made in).
fn start_h2_server(cert: &Path, key: &Path) {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = in_namespace(|| TcpListener::bind((H2, 443)).expect("bind the HTTP/2 test server"));
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let authority = req.uri().authority().map(ToString::to_string).unwrap_or_default();
                        let body = format!("proto={:?} authority={authority} path={}", req.version(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
}

/// Runs `f` on a thread inside the test namespace (its sockets are the namespace's).
pub(crate) fn in_namespace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/var/run/netns/{NAMESPACE}")).expect("the test namespace");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the test namespace");
        f()
    })
    .join()
    .unwrap()
}

impl TestNet {
    /// The test hosts' own log files (dnsmasq.log has every query the DNS server received).
    pub(crate) fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Requests the test servers received, as parsed JSON lines.
    pub(crate) fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("request log line"))
            .collect()
    }

    pub(crate) fn requests_with(&self, marker: &str) -> Vec<serde_json::Value> {
        self.requests().into_iter().filter(|r| r.to_string().contains(marker)).collect()
    }
}

/// A `matchlock` command that trusts the test CA upstream and resolves through the test DNS.
pub(crate) fn cmd(h: &Home) -> Command {
    let mut cmd = h.cmd();
    cmd.env("MATCHLOCK_UPSTREAM_CA", testnet().ca());
    cmd
}

pub(crate) fn run(h: &Home, args: &[&str]) -> Output {
    let out = cmd(h).args(["run", "--dns-servers", DNS]).args(args).output().expect("run matchlock");
    h.assert_no_leftovers();
    out
}

/// A fresh unique marker so each test finds its own requests in the shared log.
pub(crate) fn marker(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{name}-{nanos:x}")
}
