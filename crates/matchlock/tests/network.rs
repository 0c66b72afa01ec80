//! The sandbox network against real hosts (see `testnet`): policy, interception, secrets,
//! DNS, port forwards, rules and events. The hostile-guest attacks are in `hostile.rs`.

mod common;
mod testnet;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::Duration;

use common::{debian_image, home, ok, python_sdk_command, stderr, stdout, Home, Rpc};
use testnet::{cmd, marker, run, testnet, API, DNS, OTHER};

#[test]
fn interception_policy_secrets_and_dns() {
    let net = testnet();
    let h = home();
    let m = marker("t1");
    let value = format!("real-secret-{m}");
    let script = format!(
        r#"
echo "placeholder=$KEY"
echo "mtu=$(cat /sys/class/net/eth0/mtu)"
grep nameserver /etc/resolv.conf
ping -c 1 -W 2 192.168.100.1 >/dev/null && echo gateway-ping=ok
ping -c 1 -W 1 {OTHER} >/dev/null || echo remote-ping=no-reply
wget -qO- "http://api.test/echo/{m}-secret?k=$KEY" --header "Authorization: Bearer $KEY"; echo " secret-rc=$?"
wget -qO- "http://api.test/echo/{m}-split" --header "X-A: ${{KEY%????????????????}}" --header "X-B: ${{KEY#SANDBOX_SECRET_}}"; echo " split-rc=$?"
wget -qO- http://other.test/echo/{m}; echo "other-rc=$?"
wget -qO- http://a.glob.test/echo/{m}; echo " glob-rc=$?"
wget -qO- "http://a.glob.test/echo/{m}-leak" --header "X-Token: $KEY"; echo "leak-rc=$?"
printf 'GET /echo/{m}-rebind HTTP/1.1\r\nHost: rebind.test\r\nConnection: close\r\n\r\n' | nc -w 5 {API} 80 | head -1
wget -qO- http://metadata.test/latest/meta-data; echo "metadata-rc=$?"
nslookup evil.test 2>&1 | grep -q REFUSED && echo "evil-dns=refused"
echo tcp-allowed | nc -w 3 {API} 9000
echo tcp-denied | nc -w 3 {OTHER} 9000; echo "tcp-denied-rc=$?"
"#
    );
    let out = run(
        &h,
        &[
            "--image",
            "busybox",
            "--mtu",
            "1400",
            "--allow-host",
            "api.test,*.glob.test,rebind.test,metadata.test",
            "--secret",
            &format!("KEY={value}@api.test"),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "stdout:\n{o}\nstderr:\n{e}");
    let placeholder = o.lines().find_map(|l| l.strip_prefix("placeholder=")).unwrap().to_owned();
    assert!(placeholder.starts_with("SANDBOX_SECRET_") && placeholder.len() == 47, "{placeholder}");
    assert!(!o.contains(&value) && !e.contains(&value), "the secret value reached the guest:\n{o}\n{e}");
    assert!(o.contains("mtu=1400"), "{o}");
    assert!(o.contains(&format!("nameserver {DNS}")), "{o}");
    assert!(o.contains("gateway-ping=ok") && o.contains("remote-ping=no-reply"), "ICMP echo:\n{o}");
    assert!(o.contains(" secret-rc=0") && o.contains(" split-rc=0") && o.contains(" glob-rc=0"), "{o}\n{e}");
    assert!(
        o.contains("HTTP/1.1 421 Misdirected Request"),
        "a name that does not resolve to the dialled address (DNS rebinding to loopback):\n{o}"
    );
    assert!(net.requests_with(&format!("{m}-rebind")).is_empty());
    for blocked in ["other-rc=1", "leak-rc=1", "metadata-rc=1"] {
        assert!(o.contains(blocked), "{blocked}:\n{o}\n{e}");
    }
    assert!(e.contains("403 Forbidden"), "{e}");
    assert!(o.contains("evil-dns=refused"), "{o}");
    assert!(o.contains("tcp-allowed"), "non-HTTP TCP to an allowed host's address:\n{o}");
    assert!(!o.contains("\ntcp-denied\n"), "{o}");

    // What reached the servers: the real value, only at api.test, in header and query.
    let secret_requests = net.requests_with(&format!("/echo/{m}-secret\""));
    assert_eq!(secret_requests.len(), 1, "{secret_requests:?}");
    let r = &secret_requests[0];
    assert_eq!(r["server"], API);
    assert_eq!(r["headers"]["authorization"], format!("Bearer {value}"));
    assert_eq!(r["query"], format!("k={value}"));
    let split = &net.requests_with(&format!("/echo/{m}-split"))[0];
    assert!(!split.to_string().contains(&value), "{split}");
    assert!(net.requests_with(&format!("/echo/{m}-leak")).is_empty(), "placeholder sent to a non-secret host");
    assert!(net.requests_with(&value).len() == 1, "the value went somewhere else");
    assert!(net.requests().iter().all(|r| r["server"] != OTHER || !r.to_string().contains(&m)), "other.test reached");
    assert!(net.requests_with(&format!("/echo/{m}")).iter().any(|r| r["host"] == "a.glob.test"));
}

#[test]
fn https_interception_http2_sse_and_trust() {
    let net = testnet();
    let h = home();
    let m = marker("t2");
    let script = format!(
        r#"
curl -sS -w "\nver=%{{http_version}}\n" "https://api.test/echo/{m}?k=$KEY"
curl -sS --http1.1 -o /dev/null -w "h1=%{{http_version}}\n" https://api.test/echo/{m}-h1
curl -sS -w "\nsmuggle=%{{http_code}}\n" https://api.test/echo/{m}-smuggle -H "Host: other.test"
curl -sSN https://api.test/sse | while read -r line; do [ -n "$line" ] && echo "$(date +%s%N) $line"; done
curl -sS --http1.1 https://h2.test/h2check; echo
curl -sS --resolve evil.test:443:{OTHER} https://evil.test/echo/{m}; echo "evil-rc=$?"
curl -sS https://nowhere.test/; echo "nowhere-rc=$?"
python3 -c 'import socket; s=socket.socket(2, 2); s.settimeout(2); s.sendto(b"udp", ("{API}", 9001)); print(s.recv(64))' 2>/dev/null || echo udp-dropped
python3 -c '
import socket, ssl
c = ssl.create_default_context().wrap_socket(socket.create_connection(("other.test", 443)), server_hostname="other.test")
c.sendall(b"GET /echo/{m}-ws HTTP/1.1\r\nHost: other.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += c.recv(1)
c.sendall(b"ping-through-upgrade")
got = b""
while len(got) < 20:
    got += c.recv(64)
print(head.split(b"\r\n")[0].decode(), got.decode())
'
unset SSL_CERT_FILE CURL_CA_BUNDLE REQUESTS_CA_BUNDLE
curl -sS -o /dev/null -w "system-bundle=%{{http_code}}\n" https://other.test/echo/{m}
python3 -c 'import socket,ssl; c=ssl.create_default_context(); s=c.wrap_socket(socket.create_connection(("other.test", 443)), server_hostname="other.test"); print("python", s.version())'
"#
    );
    let out = run(
        &h,
        &[
            "--image",
            debian_image(),
            "--allow-host",
            "api.test,other.test,h2.test",
            "--secret",
            &format!("KEY=v-{m}@api.test"),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "stdout:\n{o}\nstderr:\n{e}");
    assert!(o.contains("ver=2"), "HTTP/2 to the guest by ALPN:\n{o}\n{e}");
    assert!(o.contains("h1=1.1"), "{o}");
    assert!(
        o.contains("proto=HTTP/2.0 authority=h2.test path=/h2check"),
        "HTTP/2 upstream for an HTTP/1.1 guest:\n{o}\n{e}"
    );
    assert!(o.contains("\nsmuggle=421"), "Host header differing from SNI:\n{o}");
    let events: Vec<u128> = o
        .lines()
        .filter(|l| l.contains("data: event"))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{o}\n{e}");
    // The server sends an event every 200 ms: arrival times show the stream was not buffered.
    assert!(events[2] - events[0] > 300_000_000, "SSE arrived buffered: {events:?}");
    assert!(o.contains("evil-rc=35") || o.contains("evil-rc=56"), "TLS to a host outside the allow-list:\n{o}\n{e}");
    assert!(o.contains("nowhere-rc=6"), "{o}");
    assert!(o.contains("HTTP/1.1 101 Switching Protocols ping-through-upgrade"), "WebSocket upgrade:\n{o}\n{e}");
    assert!(o.contains("udp-dropped"), "UDP other than DNS is dropped under interception:\n{o}");
    assert!(o.contains("system-bundle=200"), "the CA is in the system bundle:\n{o}\n{e}");
    assert!(o.contains("python TLSv1.3"), "python trusts the sandbox CA through the system bundle:\n{o}\n{e}");
    let r = &net.requests_with(&format!("/echo/{m}\""))[0];
    assert_eq!((r["tls"].as_bool(), r["query"].as_str()), (Some(true), Some(format!("k=v-{m}").as_str())));
    assert!(net.requests_with(&format!("{m}-smuggle")).is_empty());
    assert!(net.requests_with(&format!("/echo/{m}")).iter().all(|r| r["server"] != OTHER || r["host"] == "other.test"));
}

#[test]
fn runtime_allow_list_and_secret_redaction() {
    let net = testnet();
    let h = home();
    let m = marker("t3");
    let value = format!("topsecret-{m}");
    let out = cmd(&h)
        .args(["run", "-d", "--dns-servers", DNS, "--image", "busybox", "--allow-host", "api.test", "--secret"])
        .arg(format!("KEY={value}@api.test"))
        .output()
        .unwrap();
    let id = ok(&out).trim().to_owned();
    let get = |url: &str| {
        let out = h.ml(&["exec", &id, "--", "wget", "-qO-", url]);
        out.status.success()
    };
    let url = format!("http://other.test/echo/{m}");
    assert!(!get(&url), "other.test is not allowed yet");
    let added = ok(&h.ml(&["allow-list", "add", &id, "other.test,api.test"]));
    assert_eq!(added, format!("Added to {id}: other.test\nCurrent allow-list: api.test,other.test\n"));
    assert!(get(&url), "allowed after add");
    assert_eq!(
        ok(&h.ml(&["allow-list", "add", &id, "other.test"])).lines().next().unwrap(),
        format!("No new hosts were added to {id}")
    );
    let removed = ok(&h.ml(&["allow-list", "delete", &id, "other.test"]));
    assert_eq!(removed, format!("Removed from {id}: other.test\nCurrent allow-list: api.test\n"));
    assert!(!get(&url), "blocked again after delete");
    assert_eq!(net.requests_with(&format!("/echo/{m}")).len(), 1);
    // The value never shows: not in get/inspect, not in the owner's command line or the VM log.
    let get_json = ok(&h.ml(&["get", &id]));
    let inspect = ok(&h.ml(&["inspect", &id]));
    assert!(get_json.contains("SANDBOX_SECRET_") && !get_json.contains(&value), "{get_json}");
    assert!(!inspect.contains(&value));
    for (_, cmdline) in h.pids() {
        assert!(!cmdline.contains(&value), "secret in a command line: {cmdline}");
    }
    let log = std::fs::read_to_string(h.vms_dir().join(&id).join("logs/vm.log")).unwrap_or_default();
    assert!(!log.contains(&value));
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
}

/// A TCP echo server on the guest's loopback port 8080.
const ECHO_SERVER: &str = "import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 8080))
s.listen()
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    threading.Thread(target=echo, args=(s.accept()[0],)).start()
";

#[test]
fn plain_egress_port_forwards_and_no_network() {
    let net = testnet();
    let h = home();
    let m = marker("t4");
    // A host service the guest must not reach through the gateway (the host's own addresses).
    let host_service = TcpListener::bind("0.0.0.0:0").unwrap();
    host_service.set_nonblocking(true).unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    let free_port = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (publish, forward) = (free_port(), free_port());
    let out = cmd(&h)
        .args([
            "run",
            "-d",
            "--dns-servers",
            DNS,
            "--image",
            debian_image(),
            "-p",
            &format!("{publish}:8080"),
            "--",
            "python3",
            "-c",
            ECHO_SERVER,
        ])
        .output()
        .unwrap();
    let id = ok(&out).trim().to_owned();
    // Without interception: any host, any TCP port, UDP too; no allow-list to change.
    let script = format!(
        "curl -sS http://other.test/echo/{m}; echo; \
         python3 -c 'import socket; s=socket.socket(2, 2); s.settimeout(5); s.sendto(b\"udp-echo\", (\"{API}\", 9001)); print(s.recv(64).decode())'; \
         curl -sS -m 5 http://192.168.100.1:{host_port}/; echo gw-rc=$?"
    );
    let o = ok(&h.ml(&["exec", &id, "--", "sh", "-c", &script]));
    assert!(o.contains(&format!("/echo/{m}")), "{o}");
    assert!(o.contains("udp-echo"), "{o}");
    assert!(host_service.accept().is_err(), "the guest reached a host service through the gateway");
    let refused = h.ml(&["allow-list", "add", &id, "x.test"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("allow-list updates unavailable: sandbox was started without network interception")
    );
    assert_eq!(net.requests_with(&format!("/echo/{m}")).len(), 1);

    let echo_through = |port: u16| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the forward");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut reader = s.try_clone().unwrap();
        let expected = payload.clone();
        let writer = std::thread::spawn(move || s.write_all(&payload).unwrap());
        let mut got = vec![0u8; expected.len()];
        reader.read_exact(&mut got).expect("echo back");
        writer.join().unwrap();
        assert!(got == expected, "bytes changed on the way");
    };
    echo_through(publish);
    // Half-close: the client ends its side; the guest still answers everything, then ends.
    let mut s = TcpStream::connect(("127.0.0.1", publish)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"half-closed request").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("EOF after the echo");
    assert_eq!(answer, b"half-closed request");
    let mut pf = cmd(&h)
        .args(["port-forward", &id, &format!("{forward}:8080")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(pf.stderr.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, format!("Forwarding 127.0.0.1:{forward} -> sandbox:8080\n"));
    echo_through(forward);
    common::signal(&pf, nix::sys::signal::Signal::SIGINT);
    assert!(pf.wait().unwrap().success());
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));

    let out = run(&h, &["--image", "busybox", "--no-network", "--", "ls", "/sys/class/net"]);
    assert_eq!(ok(&out), "lo\n", "no NIC with --no-network");
    let out = run(&h, &["--image", "busybox", "--no-network", "--allow-host", "x.test", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--no-network"), "{}", stderr(&out));
}

#[test]
fn concurrent_sandboxes_keep_their_own_secrets() {
    let net = testnet();
    let m = marker("t5");
    let script = |host: &str, other: &str| {
        format!(
            "wget -qO- http://{host}/echo/{m} --header \"X-Key: $KEY\" >/dev/null && echo own-ok; \
             wget -qO- http://{other}/echo/{m}-cross --header \"X-Key: $KEY\" >/dev/null || echo cross-blocked"
        )
    };
    let (h1, h2) = (home(), home());
    let spawn = |h: &Home, secret: String, s: String| {
        cmd(h)
            .args([
                "run",
                "--dns-servers",
                DNS,
                "--image",
                "busybox",
                "--secret",
                &secret,
                "--allow-host",
                "api.test,other.test",
                "--",
                "sh",
                "-c",
                &s,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(&h1, format!("KEY=alpha-{m}@api.test"), script("api.test", "other.test"));
    let b = spawn(&h2, format!("KEY=beta-{m}@other.test"), script("other.test", "api.test"));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        let o = stdout(&out);
        assert!(o.contains("own-ok") && o.contains("cross-blocked"), "{o}\n{}", stderr(&out));
    }
    let own = net.requests_with(&format!("/echo/{m}"));
    assert_eq!(own.len(), 2, "{own:?}");
    for r in &own {
        let expected = if r["server"] == API { format!("alpha-{m}") } else { format!("beta-{m}") };
        assert_eq!(r["headers"]["x-key"], expected.as_str());
    }
    assert!(net.requests_with(&format!("{m}-cross")).is_empty());
}

#[test]
fn hostile_frames_and_syn_flood_leave_the_network_working() {
    let _ = testnet();
    let h = home();
    // Raw frames from the guest: random garbage, truncated headers, and a SYN flood to
    // thousands of destinations; then a normal request must still work.
    let flood = r#"
import os, random, socket, struct
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = open("/sys/class/net/eth0/address").read().strip()
src = bytes.fromhex(mac.replace(":", ""))
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return (~t) & 0xffff
gw = b"\x02\x4d\x4c\x00\x00\x01"
for i in range(2000):
    s.send(os.urandom(random.randint(14, 1514)))
    s.send(gw + src + b"\x08\x00" + os.urandom(random.randint(0, 60)))
for i in range(3000):
    dst = bytes([198, 51, 100, random.randint(1, 254)])
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, i & 0xffff, 0, 64, 6, 0, bytes([192, 168, 100, 2]), dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    tcp = struct.pack("!HHIIBBHHH", random.randint(1024, 65535), random.randint(1, 65535), i, 0, 5 << 4, 2, 65535, 0, 0)
    pseudo = bytes([192, 168, 100, 2]) + dst + struct.pack("!BBH", 0, 6, 20)
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    s.send(gw + src + b"\x08\x00" + ip + tcp)
print("flooded")
"#;
    let script = format!("python3 -c '{flood}' && sleep 1 && curl -sS -m 20 -o /dev/null -w 'after=%{{http_code}}\\n' http://api.test/echo");
    let out = run(&h, &["--image", debian_image(), "--allow-host", "api.test", "--", "sh", "-c", &script]);
    let o = stdout(&out);
    assert!(o.contains("flooded") && o.contains("after=200"), "{o}\n{}", stderr(&out));
}

#[test]
fn interception_rules_and_callbacks() {
    let net = testnet();
    let h = home();
    let m = marker("t7");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hook.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let seen = calls.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
            let call: serde_json::Value = serde_json::from_str(&line).unwrap();
            let reply = match call["callback_id"].as_str() {
                Some("cb-before") => serde_json::json!({"request": {"headers": {
                    "Host": ["other.test"], "X-From-Callback": ["cb"]}}}),
                // base64("replaced by callback")
                _ => serde_json::json!({"response": {"set_body_base64": "cmVwbGFjZWQgYnkgY2FsbGJhY2s="}}),
            };
            seen.lock().unwrap().push(call);
            (&conn).write_all(format!("{reply}\n").as_bytes()).unwrap();
        }
    });
    let rules = serde_json::json!({
        "callback_socket": socket,
        "rules": [
            {"name": "add", "hosts": ["api.test"], "set_headers": {"X-Added": "yes"}, "delete_headers": ["X-Remove"],
             "set_query": {"q": "set"}, "delete_query": ["drop"]},
            {"name": "rewrite", "path": "/old/*", "rewrite_path": format!("/echo/{m}-rewritten")},
            {"name": "deny", "path": "/forbidden", "action": "block"},
            {"name": "inert", "hosts": ["api.test"]},
            {"name": "resp", "phase": "after", "hosts": ["api.test"], "set_response_headers": {"X-Resp": "1"},
             "body_replacements": [{"find": "event", "replace": "EVENT"}]},
            {"name": "cb-before", "hosts": ["other.test"], "callback_id": "cb-before", "timeout_ms": 5000},
            {"name": "cb-after", "phase": "after", "hosts": ["other.test"], "callback_id": "cb-after"},
        ]
    });
    let rules_file = dir.path().join("rules.json");
    std::fs::write(&rules_file, rules.to_string()).unwrap();
    let script = format!(
        r#"
wget -S -qO- "http://api.test/echo/{m}?drop=1&keep=2" --header "X-Remove: r" 2>&1; echo
wget -qO- http://api.test/sse
wget -qO- http://api.test/old/x >/dev/null; echo "rewrite-rc=$?"
wget -qO- http://api.test/forbidden; echo "forbidden-rc=$?"
wget -qO- http://other.test/echo/{m}-cb; echo
"#
    );
    let out =
        run(&h, &["--image", "busybox", "--network-rules", &rules_file.to_string_lossy(), "--", "sh", "-c", &script]);
    let o = stdout(&out);
    assert!(out.status.success(), "{o}\n{}", stderr(&out));
    let r = &net.requests_with(&format!("/echo/{m}\""))[0];
    assert_eq!(r["headers"]["x-added"], "yes");
    assert!(r["headers"].get("x-remove").is_none(), "{r}");
    assert_eq!(r["query"], "keep=2&q=set");
    assert!(o.to_lowercase().contains("x-resp: 1"), "after-phase header:\n{o}");
    let events: Vec<&str> = o.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.len(), 3, "{o}");
    assert!(events.iter().all(|l| l.starts_with("data: EVENT ")), "SSE data lines rewritten: {events:?}");
    assert!(o.contains("rewrite-rc=0") && net.requests_with(&format!("/echo/{m}-rewritten")).len() == 1, "{o}");
    assert!(o.contains("forbidden-rc=1") && net.requests_with("/forbidden").is_empty(), "{o}");
    assert!(o.contains("replaced by callback"), "after-phase callback body:\n{o}");
    let cb = &net.requests_with(&format!("/echo/{m}-cb"))[0];
    assert_eq!(cb["headers"]["x-from-callback"], "cb", "{cb}");
    assert!(cb["headers"].get("user-agent").is_none(), "callback headers replace the whole set: {cb}");
    let calls = calls.lock().unwrap();
    let before = calls.iter().find(|c| c["callback_id"] == "cb-before").expect("before callback");
    assert_eq!((before["phase"].as_str(), before["host"].as_str()), (Some("before"), Some("other.test")));
    assert_eq!(before["path"], format!("/echo/{m}-cb"));
    let after = calls.iter().find(|c| c["callback_id"] == "cb-after").expect("after callback");
    assert_eq!(after["status_code"], 200);
}

/// The PyPI Python SDK (tests/sdk/test_python_network.py): allow-list, secrets, rules and
/// callbacks, checked here on the server side too.
#[test]
fn python_sdk_network_interception_and_secrets() {
    let net = testnet();
    let h = home();
    let m = marker("py");
    let secret = format!("py-secret-{m}");
    let out = python_sdk_command(&cmd(&h), "tests/sdk/test_python_network.py")
        .env("NET_DNS", DNS)
        .env("NET_MARKER", &m)
        .env("NET_SECRET", &secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "Python SDK network suite failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let r = &net.requests_with(&format!("/echo/{m}\""))[0];
    assert_eq!(r["headers"]["authorization"], format!("Bearer {secret}"), "the secret reached api.test: {r}");
    assert!(net.requests_with(&format!("{m}-leak")).is_empty(), "the placeholder went to other.test");
    assert_eq!(net.requests_with(&secret).len(), 1, "the secret went only to api.test");
    h.assert_no_leftovers();
}

/// `event` notifications of type `network` for allowed and blocked requests (raw JSON-RPC).
#[test]
fn rpc_network_events() {
    let _net = testnet();
    let h = home();
    let m = marker("ev");
    let mut rpc = Rpc::start(cmd(&h));
    let mut call = |id, method, params| rpc.call_collecting(id, method, &params);
    let (r, _) = call(
        1,
        "create",
        serde_json::json!({"image": "busybox",
            "network": {"allowed_hosts": ["api.test"], "block_private_ips": true, "dns_servers": [DNS],
                "limits": {"max_requests": 5}}}),
    );
    assert!(r["result"]["id"].is_string(), "{r}");
    let script = format!("wget -qO- http://api.test/echo/{m} >/dev/null; wget -qO- http://{OTHER}/echo/{m}; true");
    let (r, mut events) = call(2, "exec", serde_json::json!({"command": script}));
    assert_eq!(r["result"]["exit_code"], 0, "{r}");
    let (_, more) = call(3, "exec", serde_json::json!({"command": "true"}));
    events.extend(more);
    let network: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["method"] == "event")
        .map(|e| &e["params"])
        .filter(|e| e["type"] == "network")
        .collect();
    let allowed = network.iter().find(|e| e["network"]["host"] == "api.test").expect("api.test event");
    assert_eq!(allowed["network"]["url"], format!("http://api.test/echo/{m}"));
    assert_eq!(
        (allowed["network"]["status_code"].as_u64(), allowed["network"]["blocked"].as_bool()),
        (Some(200), Some(false))
    );
    assert!(allowed["network"]["response_bytes"].as_u64().unwrap() > 0, "{allowed}");
    assert!(allowed["timestamp"].as_u64().unwrap() > 1_700_000_000, "Unix seconds");
    // By address: a name outside the allow-list is already refused by DNS.
    let blocked = network.iter().find(|e| e["network"]["host"] == OTHER).expect("blocked request event");
    assert_eq!(
        (blocked["network"]["status_code"].as_u64(), blocked["network"]["blocked"].as_bool()),
        (Some(403), Some(true))
    );
    assert!(blocked["network"]["block_reason"].as_str().unwrap().contains("allow-list"), "{blocked}");
    // Our extensions: audit records as events, stats, and the budgets read and changed.
    let audit: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["method"] == "event" && e["params"]["type"] == "audit")
        .map(|e| &e["params"]["audit"])
        .collect();
    assert!(audit.iter().any(|a| a["kind"] == "http" && a["host"] == "api.test" && a["status"] == 200), "{audit:?}");
    assert!(audit.iter().any(|a| a["kind"] == "dns" && a["host"] == "api.test"), "{audit:?}");
    assert!(audit.iter().any(|a| a["kind"] == "http" && a["decision"] == "blocked"), "{audit:?}");
    let (r, _) = call(5, "stats", serde_json::json!({}));
    assert!(r["result"]["guest_memory_total"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["result"]["network"]["requests"], 1, "the refused request is not counted: {r}");
    assert!(r["result"]["execs"].as_u64().unwrap() >= 2, "{r}");
    let (r, _) = call(6, "limits", serde_json::json!({}));
    assert_eq!(
        (&r["result"]["limits"]["max_requests"], &r["result"]["usage"]["requests"]),
        (&5.into(), &1.into()),
        "{r}"
    );
    let (r, _) = call(7, "limits", serde_json::json!({"limits": {"max_requests": 1}}));
    assert_eq!(r["result"]["limits"]["max_requests"], 1, "{r}");
    let over = format!("wget -S -O- http://api.test/echo/{m}-over 2>&1 | grep -q ' 429 ' && echo over-429; true");
    let (r, _) = call(8, "exec", serde_json::json!({ "command": over }));
    // stdout is base64: "over-429\n".
    assert_eq!(r["result"]["stdout"], "b3Zlci00MjkK", "the lowered budget applies at once: {r}");
    let (r, _) = call(4, "close", serde_json::json!({"timeout_seconds": 2}));
    assert_eq!(r["result"], serde_json::json!({}));
    assert!(rpc.finish().success());
    assert!(h.processes().is_empty());
}

/// The audit records of sandbox `id` (`matchlock audit --json`), once `done` holds for them
/// (the writer is a moment behind the flows).
fn audit_records(h: &Home, id: &str, done: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = ok(&h.ml(&["audit", "--json", id]));
        let records: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if done(&records) || std::time::Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_audit_records_every_flow_with_its_decision_and_never_a_secret() {
    let net = testnet();
    let h = home();
    let m = marker("audit");
    let value = format!("audit-secret-{m}");
    let out = cmd(&h)
        .args(["run", "-d", "--dns-servers", DNS, "--image", debian_image(), "--allow-host", "api.test"])
        .args(["--secret", &format!("KEY={value}@api.test")])
        .output()
        .unwrap();
    let id = ok(&out).trim().to_owned();
    let script = format!(
        r#"
curl -sS -o /dev/null "http://api.test/bytes?n=12345&token=$KEY" -H "Authorization: Bearer $KEY"; echo "get-rc=$?"
head -c 3000 /dev/zero | tr '\0' y | curl -sS --data-binary @- http://api.test/echo/{m}-post; echo " post-rc=$?"
curl -sS -o /dev/null https://api.test/echo/{m}-tls; echo "tls-rc=$?"
curl -sS -o /dev/null http://{OTHER}/echo/{m}-ip; echo "ip-rc=$?"
curl -sS -o /dev/null https://other.test/echo/{m}-name; echo "name-rc=$?"
getent hosts evil.test || echo evil-refused
exec 3<>/dev/tcp/{API}/9000; echo tcp-allowed >&3; head -c 12 <&3; exec 3>&-
(exec 4<>/dev/tcp/{OTHER}/9000) 2>/dev/null || echo tcp-refused
echo udp >/dev/udp/{API}/9001 && echo udp-sent
curl -sk --max-time 5 -o /dev/null https://api.test:9000/; echo "tls-splice-rc=$?"
python3 - <<'PY'
import socket
s = socket.create_connection(("api.test", 80))
s.sendall(b"GET /ws-echo/{m}-ws HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(1)
buf, text = b"", 0
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
    if len(buf) >= 2 and buf[0] & 0x0F == 1 and text == 0 and len(buf) >= 2 + (buf[1] & 0x7F if buf[1] & 0x7F < 126 else 2):
        length, at = buf[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(buf[2:4], "big"), 4
        if len(buf) >= at + length:
            text = length
    if any(b & 0x0F == 8 for b in buf[:1]) or b"\x88" in buf:
        break
s.close()
print(f"ws-text={{text}}")
PY
"#
    );
    let ran = h.ml(&["exec", &id, "bash", "-c", &script]);
    let o = stdout(&ran);
    assert!(
        o.contains("get-rc=0") && o.contains("\"received\": 3000") && o.contains("tls-rc=0"),
        "{o}\n{}",
        stderr(&ran)
    );
    assert!(o.contains("tcp-allowed") && o.contains("tcp-refused") && o.contains("evil-refused"), "{o}");
    let find = |records: &[serde_json::Value], pred: &dyn Fn(&serde_json::Value) -> bool| -> Vec<serde_json::Value> {
        records.iter().filter(|r| pred(r)).cloned().collect()
    };
    let udp = |r: &serde_json::Value| r["kind"] == "udp" && r["port"] == 9001;
    let websocket = |r: &serde_json::Value| r["path"].as_str().is_some_and(|p| p.starts_with("/ws-echo/"));
    let records = audit_records(&h, &id, |rs| rs.iter().any(udp) && rs.iter().any(websocket));

    // HTTP: bytes as the server sent and received them, query values and secrets by name only.
    let get = find(&records, &|r| r["kind"] == "http" && r["path"] == "/bytes?n=&token=");
    assert_eq!(get.len(), 1, "{records:?}");
    let get = &get[0];
    assert_eq!(
        (&get["host"], &get["port"], &get["method"], &get["status"]),
        (&"api.test".into(), &80.into(), &"GET".into(), &200.into())
    );
    assert_eq!(
        (&get["bytes_down"], &get["decision"], &get["secrets"]),
        (&12345.into(), &"allowed".into(), &serde_json::json!(["KEY"]))
    );
    let post = find(&records, &|r| r["path"] == format!("/echo/{m}-post"));
    assert_eq!(post.len(), 1, "{records:?}");
    assert_eq!((&post[0]["method"], &post[0]["bytes_up"]), (&"POST".into(), &3000.into()), "{post:?}");
    let tls = find(&records, &|r| r["path"] == format!("/echo/{m}-tls"));
    assert_eq!(tls.len(), 1, "{records:?}");
    assert_eq!(
        (&tls[0]["scheme"], &tls[0]["tls_intercepted"], &tls[0]["port"]),
        (&"https".into(), &true.into(), &443.into())
    );
    let by_ip = find(&records, &|r| r["kind"] == "http" && r["host"] == OTHER);
    assert_eq!(by_ip.len(), 1, "{records:?}");
    assert_eq!((&by_ip[0]["decision"], &by_ip[0]["status"]), (&"blocked".into(), &403.into()), "{by_ip:?}");
    assert!(net.requests_with(&format!("{m}-ip")).is_empty(), "the refused request reached the server");
    // DNS: refused names, the allowed one answered.
    for name in ["other.test", "evil.test"] {
        let dns = find(&records, &|r| r["kind"] == "dns" && r["host"] == name);
        assert!(
            !dns.is_empty() && dns.iter().all(|r| r["decision"] == "blocked" && r["answer"] == "REFUSED"),
            "{name}: {dns:?}"
        );
    }
    let api = find(&records, &|r| r["kind"] == "dns" && r["host"] == "api.test" && r["query_type"] == "A");
    assert!(!api.is_empty() && api.iter().all(|r| r["decision"] == "allowed" && r["answer"] == "NOERROR"), "{api:?}");
    // TCP and UDP flows.
    let tcp = find(&records, &|r| r["kind"] == "tcp" && r["port"] == 9000);
    assert_eq!(tcp.len(), 3, "{records:?}");
    let allowed = tcp.iter().find(|r| r["decision"] == "allowed" && r["sni"].is_null()).expect("the allowed flow");
    // TLS spliced through (not intercepted): the ClientHello's server name.
    assert!(tcp.iter().any(|r| r["sni"] == "api.test" && r["decision"] == "allowed"), "{tcp:?}");
    // A WebSocket: one record, the relay's bytes in it.
    let ws = find(&records, &|r| r["path"] == format!("/ws-echo/{m}-ws"));
    assert_eq!(ws.len(), 1, "{records:?}");
    let text: u64 =
        o.split("ws-text=").nth(1).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(text > 100, "the guest read the server's message: {o}");
    assert_eq!(ws[0]["status"], 101, "{ws:?}");
    assert!(ws[0]["bytes_down"].as_u64().unwrap() >= text, "the relay's bytes: {ws:?} (text {text})");
    assert_eq!(
        (&allowed["host"], &allowed["addr"]),
        (&"api.test".into(), &API.into()),
        "named by the DNS answer: {allowed}"
    );
    assert_eq!((&allowed["bytes_up"], &allowed["bytes_down"]), (&12.into(), &12.into()), "{allowed}");
    assert!(tcp.iter().any(|r| r["decision"] == "blocked" && r["host"] == OTHER), "{tcp:?}");
    let udp = find(&records, &udp);
    assert_eq!(udp.len(), 1, "{records:?}");
    assert_eq!(udp[0]["decision"], "blocked", "interception lets only DNS out over UDP: {udp:?}");

    // Never the value, anywhere in the sandbox's files (it did reach the server).
    assert!(!net.requests_with(&value).is_empty(), "the secret was used");
    let mut files = vec![h.vms_dir()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
        } else if let Ok(bytes) = std::fs::read(&path) {
            assert!(!bytes.windows(value.len()).any(|w| w == value.as_bytes()), "the value is in {}", path.display());
        }
    }
    // HAR 1.2, as a third-party HAR reader understands it.
    let har = h.ml(&["audit", "--har", &id]);
    let site = ok(&std::process::Command::new("bash")
        .arg(common::repo_root().join("scripts/install-har-reader.sh"))
        .output()
        .unwrap())
    .trim()
    .to_owned();
    let mut reader = std::process::Command::new("python3")
        .arg(common::repo_root().join("tests/fixtures/har_check.py"))
        .env("PYTHONPATH", site)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    reader.stdin.take().unwrap().write_all(&har.stdout).unwrap();
    let read = reader.wait_with_output().unwrap();
    let read: serde_json::Value = serde_json::from_str(&ok(&read)).unwrap();
    assert_eq!((&read["version"], &read["creator"]), (&"1.2".into(), &"matchlock".into()), "{read}");
    let entries = read["entries"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        records.iter().filter(|r| r["kind"] == "http").count(),
        "one entry per HTTP record: {read}"
    );
    let bytes = entries.iter().find(|e| e["url"] == "http://api.test/bytes?n=&token=").expect("the download");
    assert_eq!(
        (&bytes["status"], &bytes["response_body"], &bytes["method"]),
        (&200.into(), &12345.into(), &"GET".into())
    );
    assert_eq!((&bytes["query"], &bytes["http_version"]), (&serde_json::json!(["n", "token"]), &"HTTP/1.1".into()));
    assert!(bytes["started"].as_str().unwrap().starts_with("20"), "{bytes}");
    let tls = entries.iter().find(|e| e["url"] == format!("https://api.test/echo/{m}-tls")).expect("the HTTPS request");
    assert_eq!(tls["status"], 200, "{tls}");
    assert!(entries.iter().any(|e| e["status"] == 403 && e["server"] == OTHER), "{read}");
    assert!(!String::from_utf8_lossy(&har.stdout).contains(&value));

    // The table and the refusals alone; kept after the sandbox stops, gone with rm.
    let table = ok(&h.ml(&["audit", &id]));
    assert!(table.contains("api.test:80") && table.contains("BLOCKED") && table.contains("KEY"), "{table}");
    let blocked = ok(&h.ml(&["audit", "--blocked", "--json", &id]));
    let refusals = records.iter().filter(|r| r["decision"] == "blocked").count();
    assert_eq!(blocked.lines().count(), refusals, "{blocked}");
    assert!(blocked.lines().all(|l| l.contains(r#""decision":"blocked""#)), "{blocked}");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["inspect", &id]))).unwrap();
    assert_eq!(
        (&inspect["audit"]["records"], &inspect["audit"]["blocked"]),
        (&records.len().into(), &refusals.into()),
        "{inspect}"
    );
    ok(&h.ml(&["kill", &id]));
    assert_eq!(audit_records(&h, &id, |_| true).len(), records.len(), "the audit outlives the sandbox");
    ok(&h.ml(&["rm", &id]));
    let gone = h.ml(&["audit", &id]);
    assert!(!gone.status.success() && stderr(&gone).contains("not found"), "{}", stderr(&gone));
}

#[test]
fn the_audit_stays_within_its_bound_under_a_dns_flood_and_survives_a_kill_9_of_its_owner() {
    let h = home();
    let out = cmd(&h)
        .args(["run", "-d", "--dns-servers", DNS, "--image", debian_image(), "--allow-host", "api.test"])
        .args(["--audit-max-size", "1"])
        .output()
        .unwrap();
    let id = ok(&out).trim().to_owned();
    // 50 000 questions for names the allow-list refuses, as fast as the guest sends them.
    let flood = r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(50000):
    name = b"".join(bytes([len(p)]) + p for p in (b"n%d" % i, b"flood", b"test")) + b"\0"
    s.sendto(struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1), ("198.51.100.53", 53))
print("sent")
"#;
    let sent = h.ml(&["exec", &id, "python3", "-c", flood]);
    assert_eq!(stdout(&sent), "sent\n", "{}", stderr(&sent));
    let dir = h.vms_dir().join(&id);
    let on_disk = || -> u64 {
        ["audit.jsonl", "audit.1.jsonl"].iter().map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len())).sum()
    };
    // Until the writer is done: the count of records stops changing.
    let mut last = (0, 0);
    let records = loop {
        std::thread::sleep(Duration::from_millis(500));
        let out = h.ml(&["audit", "--json", &id]);
        let records = ok(&out).lines().count();
        let now = (records, on_disk());
        if now == last {
            break (out, records);
        }
        last = now;
    };
    let (audit, kept) = records;
    assert!(on_disk() <= 1 << 20, "{} bytes for a 1 MB bound", on_disk());
    assert!(kept > 1000, "the newest records are kept: {kept}");
    let note = stderr(&audit);
    let rotated: u64 = note.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(note.contains("rotated out") && rotated > 0, "what the bound cost is reported: {note}");
    assert!(ok(&audit).lines().all(|l| l.contains(r#""kind":"dns""#) && l.contains("flood.test")), "{}", ok(&audit));

    // kill -9 of the owner: every record written stays readable (one write per record).
    let get: serde_json::Value = serde_json::from_str(&ok(&h.ml(&["get", &id]))).unwrap();
    let owner = get["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(owner), nix::sys::signal::Signal::SIGKILL).unwrap();
    while std::fs::read_to_string(format!("/proc/{owner}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = h.ml(&["audit", "--json", &id]);
    assert_eq!(ok(&after).lines().count(), kept, "{}", stderr(&after));
    assert!(
        !stderr(&after).contains(", 1 unreadable") && stderr(&after).contains(" 0 unreadable"),
        "{}",
        stderr(&after)
    );
    ok(&h.ml(&["gc"]));
    assert_eq!(ok(&h.ml(&["audit", "--json", &id])).lines().count(), kept, "gc keeps the audit");
    ok(&h.ml(&["rm", &id]));
    h.assert_no_leftovers();
}

#[test]
fn budgets_and_rate_limits_refuse_past_their_limit_and_are_raised_live() {
    let net = testnet();
    let h = home();
    let m = marker("budget");
    let out = cmd(&h)
        .args(["run", "-d", "--dns-servers", DNS, "--image", debian_image(), "--allow-host", "api.test,*.glob.test"])
        .args(["--max-requests", "3", "--rate-limit", "a.glob.test=2/m"])
        .args(["--audit-bodies", "--secret", &format!("KEY=body-secret-{m}@api.test")])
        .output()
        .unwrap();
    let id = ok(&out).trim().to_owned();
    let exec = |script: &str| -> String {
        let out = h.ml(&["exec", &id, "bash", "-c", script]);
        stdout(&out)
    };
    let limits = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["limits", "--json"];
        all.extend_from_slice(args);
        all.push(&id);
        serde_json::from_str(&ok(&h.ml(&all))).unwrap()
    };

    // A rate of 2 per minute: a burst of two, then 429 with Retry-After; the request budget
    // counts what went out.
    let o = exec(&format!(
        r#"for i in 1 2 3; do curl -s -o /dev/null -w "rate-$i=%{{http_code}}\n" http://a.glob.test/echo/{m}-rate-$i; done
curl -s -D - -o /dev/null http://a.glob.test/echo/{m}-rate-4 | tr -d '\r' | grep -i '^retry-after:'
curl -s -o /dev/null -w "req3=%{{http_code}}\n" http://api.test/echo/{m}-req3
curl -s -w "\nreq4=%{{http_code}}\n" http://api.test/echo/{m}-req4"#
    ));
    assert!(o.contains("rate-1=200\nrate-2=200\nrate-3=429\n"), "{o}");
    let retry: u64 = o
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after: ").map(str::to_owned))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=30).contains(&retry), "Retry-After within the refill time: {o}");
    assert!(o.contains("req3=200") && o.contains("matchlock: the budget of 3 requests is spent\n\nreq4=429"), "{o}");
    for (part, reached) in
        [("rate-1", true), ("rate-2", true), ("rate-3", false), ("rate-4", false), ("req3", true), ("req4", false)]
    {
        assert_eq!(net.requests_with(&format!("/echo/{m}-{part}\"")).len(), usize::from(reached), "{part}");
    }

    // Raised live: no request limit, 1 MB to receive.
    let set = limits(&["--max-requests", "none", "--ingress-budget", "1MB"]);
    assert_eq!(set["limits"]["ingress_bytes"], 1 << 20, "{set}");
    assert_eq!(set["usage"]["requests"], 3, "{set}");
    let o = exec(&format!(
        r#"curl -s -o /dev/null -w "small=%{{http_code}} %{{size_download}}\n" "http://api.test/bytes?n=102400"
curl -s -o /dev/null -w "big=%{{size_download}}" "http://api.test/bytes?n=3145728"; echo " big-rc=$?"
curl -s -w "\nafter=%{{http_code}}\n" http://api.test/echo/{m}-after
(exec 3<>/dev/tcp/{API}/9000) 2>/dev/null && echo tcp-open || echo tcp-refused"#
    ));
    assert!(o.contains("small=200 102400"), "positive control: {o}");
    let big: u64 =
        o.split("big=").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(big <= (1 << 20) + (64 << 10), "the download was cut at the ingress budget: {big}\n{o}");
    assert!(!o.contains("big-rc=0"), "{o}");
    assert!(o.contains("matchlock: the ingress budget of 1048576 bytes is spent\n\nafter=429"), "{o}");
    assert!(o.contains("tcp-refused"), "new connections refused once a budget is spent: {o}");
    assert!(net.requests_with(&format!("/echo/{m}-after")).is_empty());

    // 64 KB to send: an upload is cut there, what the server received says so.
    limits(&["--ingress-budget", "none", "--egress-budget", "64KB"]);
    let o = exec(&format!(
        r#"head -c 204800 /dev/zero | curl -s -o /dev/null -w "up=%{{http_code}}\n" --data-binary @- http://api.test/upload/{m}-up
curl -s -w "\nafter=%{{http_code}}\n" http://api.test/echo/{m}-after-up"#
    ));
    // What the server received: it logs the request when it starts and the bytes when its read
    // ends (the cut may reach it after the guest's answer); a request cut before its head
    // left the proxy never arrived at all (0 bytes).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let up = loop {
        let seen = net.requests_with(&format!("/upload/{m}-up"));
        let received = seen.iter().find_map(|r| r["post_received"].as_u64());
        if received.is_some() || std::time::Instant::now() > deadline {
            break received.or(seen.is_empty().then_some(0));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let up = up.expect("the server began to receive the upload and never saw it end: the proxy left it hanging");
    assert!(up <= (64 << 10) + (64 << 10), "the upload was cut near the egress budget: {up} bytes arrived\n{o}");
    // The guest sees the cut as a reset or the proxy's 502, whichever comes first; never a 200.
    assert!(o.contains("up=") && !o.contains("up=200"), "{o}");
    assert!(o.contains("matchlock: the egress budget of 65536 bytes is spent\n\nafter=429"), "{o}");

    // Raised again: the next request passes.
    limits(&["--egress-budget", "none", "--ingress-budget", "none"]);
    let o = exec(&format!(r#"curl -s -o /dev/null -w "raised=%{{http_code}}\n" http://api.test/echo/{m}-raised"#));
    assert!(o.contains("raised=200"), "{o}");
    assert_eq!(net.requests_with(&format!("/echo/{m}-raised\"")).len(), 1);
    // --audit-bodies: the first 4096 bytes of each body and the query values, as the guest
    // sent (placeholders) and got them (scrubbed: the echo of the value comes back masked).
    let o = exec(&format!(
        r#"head -c 5000 /dev/zero | tr '\0' y | curl -s -o /dev/null -w "body=%{{http_code}}\n" -H "Authorization: Bearer $KEY" --data-binary @- "http://api.test/upload/{m}-body?k=$KEY"
curl -s -o /dev/null -w "echo=%{{http_code}}\n" -H "Authorization: Bearer $KEY" "http://api.test/echo/{m}-echo?k=$KEY""#
    ));
    assert!(o.contains("body=200") && o.contains("echo=200"), "{o}");
    let done = |rs: &[serde_json::Value]| {
        rs.iter().any(|r| r["path"].as_str().is_some_and(|p| p.starts_with(&format!("/echo/{m}-echo"))))
    };
    let records = audit_records(&h, &id, done);
    let decode = |v: &serde_json::Value| {
        let out = std::process::Command::new("base64").arg("-d").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn();
        let mut child = out.unwrap();
        child.stdin.take().unwrap().write_all(v.as_str().unwrap_or_default().as_bytes()).unwrap();
        String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
    };
    let upload = records
        .iter()
        .find(|r| r["path"].as_str().is_some_and(|p| p.starts_with(&format!("/upload/{m}-body"))))
        .unwrap();
    assert!(
        upload["path"].as_str().unwrap().contains("?k=SANDBOX_SECRET_"),
        "the query as the guest sent it: {upload}"
    );
    assert_eq!(decode(&upload["request_body"]), "y".repeat(4096), "the first 4096 bytes");
    assert_eq!((&upload["bodies_cut"], &upload["bytes_up"]), (&true.into(), &5000.into()), "{upload}");
    let echo =
        records.iter().find(|r| r["path"].as_str().is_some_and(|p| p.starts_with(&format!("/echo/{m}-echo")))).unwrap();
    let echoed = decode(&echo["response_body"]);
    assert!(echoed.contains("Bearer SANDBOX_SECRET_") && !echoed.contains("body-secret-"), "scrubbed: {echoed}");
    assert!(net.requests_with(&format!("body-secret-{m}")).len() >= 2, "the server did receive the value");
    let mut files = vec![h.vms_dir()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
        } else if let Ok(bytes) = std::fs::read(&path) {
            let value = format!("body-secret-{m}");
            assert!(!bytes.windows(value.len()).any(|w| w == value.as_bytes()), "the value is in {}", path.display());
        }
    }

    // Every refusal is in the audit with its reason.
    let refusals = ok(&h.ml(&["audit", "--blocked", "--json", &id]));
    assert!(refusals.contains("rate limit of 2 requests per 60 s for a.glob.test"), "{refusals}");
    assert!(refusals.contains("budget of 3 requests") && refusals.contains("egress budget"), "{refusals}");
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
}

#[test]
fn stats_show_the_guest_memory_growing_and_the_bytes_of_a_known_transfer() {
    testnet();
    let h = home();
    let out = cmd(&h)
        .args(["run", "-d", "--dns-servers", DNS, "--image", debian_image(), "--allow-host", "api.test"])
        .output()
        .unwrap();
    let id = ok(&out).trim().to_owned();
    let stats = || -> serde_json::Value {
        let out = ok(&h.ml(&["stats", "--no-stream", "--json", &id]));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let before = stats();
    assert_eq!(before["id"], id.as_str());
    assert!(before["guest_memory_total"].as_u64().unwrap() > 400 << 20, "{before}");
    assert!(
        before["host_private_bytes"].as_u64().unwrap() > 0 && before["disk_bytes"].as_u64().unwrap() > 0,
        "{before}"
    );
    // A known transfer: 2 000 000 bytes of body, plus the response's head.
    let got = h.ml(&[
        "exec",
        &id,
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        "http://api.test/bytes?n=2000000",
    ]);
    assert_eq!(stdout(&got), "2000000", "{}", stderr(&got));
    let after = stats();
    let received =
        after["network"]["ingress_bytes"].as_u64().unwrap() - before["network"]["ingress_bytes"].as_u64().unwrap();
    assert!((2_000_000..2_000_000 + 4096).contains(&received), "ingress {received}: {after}");
    assert_eq!(after["network"]["requests"].as_u64().unwrap(), before["network"]["requests"].as_u64().unwrap() + 1);
    assert_eq!(after["execs"].as_u64().unwrap(), before["execs"].as_u64().unwrap() + 1, "{after}");
    // A process holding 200 MB: the guest's memory grows by about that, with a process more.
    let mut hog = h.spawn(&["exec", &id, "python3", "-c", "b = bytearray(200 << 20); import time; time.sleep(60)"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let grown = loop {
        let now = stats();
        let grown =
            now["guest_memory_used"].as_u64().unwrap().saturating_sub(after["guest_memory_used"].as_u64().unwrap());
        if grown > 180 << 20 || std::time::Instant::now() > deadline {
            break (grown, now);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(grown.0 > 180 << 20, "guest memory grew by {} bytes: {}", grown.0, grown.1);
    assert!(grown.1["pids"].as_u64().unwrap() > after["pids"].as_u64().unwrap(), "{}", grown.1);
    assert!(grown.1["guest_cpu_usec"].as_u64().unwrap() > before["guest_cpu_usec"].as_u64().unwrap());
    let _ = hog.kill();
    let _ = hog.wait();
    // The table names the columns.
    let table = ok(&h.ml(&["stats", "--no-stream", &id]));
    assert!(table.starts_with("ID") && table.contains("NET I/O") && table.contains(&id), "{table}");
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
}
