//! A hostile guest against the secrets and egress promises (docs/SECURITY.md): real VMs, the
//! real test hosts of `testnet`, and assertions on what the servers *really received* (what
//! the guest sees is scrubbed, so it could lie). Each attack sits next to a positive control
//! that must still work, so a fix that breaks the feature cannot pass.

mod common;
mod testnet;

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::Stdio;

use common::{debian_image, home, ok, repo_root, stderr, stdout};
use testnet::{cmd, marker, testnet, API, DNS, HOST_SIDE, HOST_VETH, OTHER};

/// Lines `name: seen` printed by tests/fixtures/hostile_guest.py.
fn reports(out: &str) -> HashMap<String, String> {
    out.lines().filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Nothing ever connected to `listener` (it is non-blocking).
#[track_caller]
fn never_reached(listener: &TcpListener, what: &str) {
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what} was reached from {peer}"),
        Err(e) => panic!("{what}: {e}"),
    }
}

#[test]
fn secrets_and_egress_hold_against_a_hostile_guest() {
    let net = testnet();
    let h = home();
    let m = marker("hostile");
    let value = format!("real-{m}");
    // Services on the host's own address: by name through the proxy (:80) and raw TCP.
    let host_http = TcpListener::bind((HOST_SIDE, 80)).expect("bind the host's port 80");
    let host_tcp = TcpListener::bind((HOST_SIDE, 0)).unwrap();
    for l in [&host_http, &host_tcp] {
        l.set_nonblocking(true).unwrap();
    }
    let program = std::fs::read(repo_root().join("tests/fixtures/hostile_guest.py")).unwrap();
    let mut child = cmd(&h)
        .args(["run", "-i", "--dns-servers", DNS, "--image", debian_image()])
        .args(["--allow-host", &format!("api.test,other.test,hostself.test,pinned.test,{HOST_SIDE}")])
        .args(["--add-host", &format!("pinned.test:{API}")])
        .args(["--secret", &format!("KEY={value}@api.test"), "-e", &format!("M={m}")])
        .args(["-e", &format!("HOST_PORT={}", host_tcp.local_addr().unwrap().port()), "--", "python3", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&program).unwrap();
    let out = child.wait_with_output().unwrap();
    h.assert_no_leftovers();
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success() && o.contains("\ndone\n"), "stdout:\n{o}\nstderr:\n{e}");
    assert!(!o.contains(&value) && !e.contains(&value), "the value reached the guest:\n{o}\n{e}");
    assert!(
        net.requests().iter().filter(|r| r["server"] != API).all(|r| !r.to_string().contains(&value)),
        "the value left api.test"
    );
    println!("{o}"); // shown when an assertion below fails
    let seen = reports(&o);
    let saw = |name: &str| seen.get(name).unwrap_or_else(|| panic!("no {name} in:\n{o}")).as_str();
    let placeholder = "Bearer SANDBOX_SECRET_";

    // 1. One destination per request.
    for name in ["tls-foreign-host", "abs-foreign-host", "proxy-other-port"] {
        assert_eq!(saw(name), "'HTTP/1.1 421 Misdirected Request'", "{name}");
    }
    for name in ["curl-abs-foreign-host", "curl-proxy-other-port"] {
        assert_eq!(saw(name), "'421'", "{name}");
    }
    for name in ["two-hosts", "two-hosts-tls", "userinfo-host", "connect"] {
        assert_eq!(saw(name), "'HTTP/1.1 400 Bad Request'", "{name}");
    }
    // Behind a good request, a lone foreign Host is a request to a host outside the allow-list.
    assert_eq!(saw("pipelined"), "['HTTP/1.1 200 OK', 'HTTP/1.1 403 Forbidden']");
    assert_eq!(saw("host-case"), "'HTTP/1.1 200 OK'", "Host is compared without case");
    assert_eq!(saw("long"), "'HTTP/1.1 200 OK'");
    assert_eq!(saw("encoded-other"), "'HTTP/1.1 200 OK'", "an encoded placeholder is only text");
    assert!(saw("http10-no-host").contains("403"), "{}", saw("http10-no-host"));
    assert_eq!(saw("h2c"), "'HTTP/1.1 200 OK'", "an h2c upgrade is served as HTTP/1.1");
    assert_eq!(saw("pinned"), "'HTTP/1.1 200 OK'", "a name the user pinned (--add-host) to the dialled address");
    assert!(saw("h2-positive").starts_with("[4,") && saw("h2-positive").contains(", 1"), "{}", saw("h2-positive"));
    // 3. Nothing returns unscrubbed.
    for name in ["gzip-http", "gzip-https", "deflate-http", "deflate-https"] {
        assert!(saw(name).contains(placeholder), "{name}: the echo, decoded and scrubbed: {}", saw(name));
    }
    let header_echo = saw("header-echo");
    assert!(header_echo.starts_with("'HTTP/1.1 200 OK\\r\\n"), "the reason phrase is not copied: {header_echo}");
    assert!(header_echo.contains(&format!("x-echo: {placeholder}")), "{header_echo}");
    let trailer_echo = saw("trailer-echo");
    assert!(trailer_echo.contains(&format!("x-echo: {placeholder}")), "the trailer, scrubbed: {trailer_echo}");
    let websocket = saw("websocket");
    assert!(websocket.starts_with("['HTTP/1.1 101 Switching Protocols', (1, '{"), "{websocket}");
    assert!(
        websocket.contains(&format!("(1, '{placeholder}")),
        "the fragmented message, whole and scrubbed: {websocket}"
    );
    assert!(!websocket.contains("permessage-deflate"), "no compression extension: {websocket}");
    assert_eq!(saw("redirect"), "'403'", "the credentials, followed to another host, are blocked");
    // 6. DNS.
    assert_eq!(saw("dns-positive"), "{'rcode': 0, 'answers': 1}");
    assert_eq!(saw("dns-two-questions"), "{'rcode': 5, 'answers': 0}", "REFUSED");
    // 5. The host itself.
    assert!(saw("host-http-by-name").contains("403"), "{}", saw("host-http-by-name"));
    assert!(saw("host-tcp").starts_with("'error"), "{}", saw("host-tcp"));
    never_reached(&host_http, "the host's port 80 (by an allowed name)");
    never_reached(&host_tcp, "a host TCP service (by an allowed address)");

    // What the servers really received.
    let requests = net.requests_with(&m);
    for attack in [
        "t1", "t2", "t2curl", "two", "two-tls", "userinfo", "port", "curlport", "pipe2", "h10", "h2evil", "h2auth",
        "redir", "hostself",
    ] {
        let target = format!("{m}-{attack}");
        let got: Vec<_> = requests
            .iter()
            .filter(|r| {
                r["path"].as_str().is_some_and(|p| p.ends_with(&target)) || r["data"].to_string().contains(&target)
            })
            .collect();
        assert!(got.is_empty(), "attack {attack} reached a server: {got:?}");
    }
    let long = requests.iter().find(|r| r["path"].as_str().is_some_and(|p| p.ends_with("-long"))).unwrap();
    assert_eq!(long["headers"]["x-long"], vec![value.as_str(); 150].join(","), "every copy replaced");
    let encoded: Vec<_> = requests.iter().filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with("-enc"))).collect();
    assert_eq!(encoded.len(), 1);
    assert_eq!(encoded[0]["server"], OTHER);
    assert!(encoded[0]["query"].as_str().unwrap().contains("SANDBOX%5FSECRET"), "{:?}", encoded[0]);
    for r in requests.iter().filter(|r| !r["path"].as_str().is_some_and(|p| p.ends_with("-enc"))) {
        assert!(r.get("raw_port").is_none(), "the raw listener on another port received: {r}");
        assert_eq!(r["server"], API, "only api.test was reached: {r}");
        let pinned = r["path"].as_str().is_some_and(|p| p.ends_with("-pinned"));
        assert_eq!(
            r["host"],
            if pinned { "pinned.test" } else { "api.test" },
            "the upstream Host is the decided one: {r}"
        );
    }
    for control in ["-pipe1", "-case", "-h2ok", "-h2c", "gzip-echo/", "deflate-echo/", "ws-echo/", "redirect/"] {
        let got: Vec<_> = requests.iter().filter(|r| r["path"].as_str().unwrap_or("").contains(control)).collect();
        assert!(!got.is_empty(), "positive control {control} did not reach api.test");
        for r in got {
            assert_eq!(r["headers"]["authorization"], format!("Bearer {value}"), "{control}: the real value: {r}");
        }
    }
    assert_eq!(requests.iter().filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with("-pinned"))).count(), 1);
    let h2c = requests.iter().find(|r| r["path"].as_str().unwrap_or("").contains("-h2c")).unwrap();
    assert!(h2c["headers"].get("upgrade").is_none(), "the h2c upgrade was dropped: {h2c}");
    let dns_log = net.log("dnsmasq.log");
    assert!(!dns_log.contains(&format!("exfil-{m}")), "the smuggled DNS name reached the server");
    assert!(dns_log.contains("query[A] api.test"), "positive control: the DNS server is asked:\n{dns_log}");
}

#[test]
fn helpers_hold_no_secrets() {
    let net = testnet();
    let h = home();
    let m = marker("env");
    let (given, inherited) = (format!("given-{m}"), format!("inherited-{m}"));
    let out = cmd(&h)
        .env("MY_HOST_SECRET", &inherited)
        .args(["run", "-d", "--dns-servers", DNS, "--image", "busybox", "--allow-host", "api.test"])
        .args(["--secret", &format!("KEY={given}@api.test"), "--secret", "MY_HOST_SECRET@api.test"])
        .output()
        .unwrap();
    let id = ok(&out).trim().to_owned();
    let pids = processes_of(&h);
    let helpers: Vec<&(i32, String)> = pids.iter().filter(|(_, c)| c.contains("qemu-system")).collect();
    assert_eq!(helpers.len(), 1, "QEMU: {pids:?}");
    assert!(pids.len() >= 2, "the owner too: {pids:?}");
    for (pid, cmdline) in &pids {
        let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned();
        for secret in [&given, &inherited] {
            assert!(!environ.contains(secret.as_str()), "a secret in the environment of {cmdline}");
            assert!(!cmdline.contains(secret.as_str()), "a secret in the command line {cmdline}");
        }
    }
    // Positive control: the owner still has both values and sends them to api.test.
    let script = format!("wget -qO- http://api.test/echo/{m} --header \"X-A: $KEY\" --header \"X-B: $MY_HOST_SECRET\"");
    ok(&h.ml(&["exec", &id, "--", "sh", "-c", &script]));
    let r = &net.requests_with(&format!("/echo/{m}"))[0];
    assert_eq!(
        (r["headers"]["x-a"].as_str(), r["headers"]["x-b"].as_str()),
        (Some(given.as_str()), Some(inherited.as_str()))
    );
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
}

/// Every process started for `h`: its command line or its environment (HOME) names it.
fn processes_of(h: &common::Home) -> Vec<(i32, String)> {
    let home = h.vms_dir().parent().unwrap().parent().unwrap().to_string_lossy().into_owned();
    let mut found = h.pids();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if pid != std::process::id() as i32
            && String::from_utf8_lossy(&environ).contains(&format!("HOME={home}\0"))
            && !found.iter().any(|(p, _)| *p == pid)
        {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// The host's addresses other than the test veth's (its primary interface, say).
fn host_addresses() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter(|i| i.interface_name != "lo" && i.interface_name != HOST_VETH)
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
        .collect()
}

#[test]
fn the_host_is_never_a_destination_without_interception() {
    let net = testnet();
    let h = home();
    let m = marker("self");
    // Bound on every address: the veth end and the primary interface address both lead here.
    let tcp = TcpListener::bind("0.0.0.0:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let (tcp_port, udp_port) = (tcp.local_addr().unwrap().port(), udp.local_addr().unwrap().port());
    let mut targets = vec![HOST_SIDE.to_owned()];
    targets.extend(host_addresses().iter().map(ToString::to_string));
    let mut script = format!("curl -sS -m 5 http://other.test/echo/{m} >/dev/null && echo egress-ok\n");
    for ip in &targets {
        script += &format!(
            "python3 -c 'import socket; s=socket.socket(2, 2); [s.sendto(b\"{m}\", (\"{ip}\", {udp_port})) for _ in range(3)]'\n\
             curl -sS -m 5 http://{ip}:{tcp_port}/{m}; echo \" tcp-{ip}=$?\"\n"
        );
    }
    let out = testnet::run(&h, &["--image", debian_image(), "--", "sh", "-c", &script]);
    let o = stdout(&out);
    assert!(o.contains("egress-ok"), "positive control: open egress works:\n{o}\n{}", stderr(&out));
    for ip in &targets {
        assert!(!o.contains(&format!(" tcp-{ip}=0")), "{ip}:\n{o}");
    }
    never_reached(&tcp, "a host TCP service on all addresses");
    let mut buf = [0u8; 64];
    assert_eq!(udp.recv(&mut buf).map_err(|e| e.kind()), Err(ErrorKind::WouldBlock), "a host UDP service was reached");
    assert_eq!(net.requests_with(&format!("/echo/{m}")).len(), 1);
    assert!(net.requests().iter().all(|r| r["server"] != OTHER || !r.to_string().contains(&format!("{m}/"))));
}

/// A guest program that floods the host's workspace server: `conns` vsock connections to it
/// and the host pipe's device opened (both must fail: only guest-init holds the pipe), then
/// as many open files in the workspace as it can get; it prints what it got, says `holding`
/// and keeps everything open for `hold` seconds.
const FLOOD: &str = r#"
import glob, os, socket, sys, time
conns, hold = int(sys.argv[1]), float(sys.argv[2])
ports = glob.glob("/dev/vport*")
opened = 0
for p in ports:
    try:
        os.open(p, os.O_RDWR)
        opened += 1
    except OSError:
        pass
print(f"ports={len(ports)} opened={opened}", flush=True)
held = []
for _ in range(conns):
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect((2, 5001))
        held.append(s)
    except OSError:
        pass
files, error = [], None
for i in range(6000):
    try:
        files.append(open("/workspace/f", "rb"))
    except OSError as e:
        error = e.errno
        break
print(f"connections={len(held)} files={len(files)} errno={error}", flush=True)
print("holding", flush=True)
time.sleep(hold)
"#;

fn count(dir: String) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_guest_flooding_the_workspace_server_leaves_the_owner_bounded() {
    use std::io::BufRead;
    let h = home();
    let workspace = tempfile::tempdir().unwrap();
    std::fs::write(workspace.path().join("f"), "x").unwrap();
    let mount = format!("{}:/workspace", workspace.path().display());
    let id = ok(&h.ml(&["run", "-d", "--image", debian_image(), "-v", &mount])).trim().to_owned();
    let (owner, _) =
        processes_of(&h).into_iter().find(|(_, c)| c.contains("detached-owner")).expect("the detached owner");
    let threads_before = count(format!("/proc/{owner}/task"));
    let mut flood = h
        .cmd()
        .args(["exec", &id, "--", "sh", "-c", "ulimit -n 16384 && exec python3 -c \"$0\" \"$@\"", FLOOD, "3000", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(flood.stdout.take().unwrap()).lines();
    let ports = lines.next().expect("the flood's port report").unwrap();
    assert_eq!(ports, "ports=1 opened=0", "a workload cannot open the host pipe");
    let got = lines.next().expect("the flood's report").unwrap();
    assert!(got.starts_with("connections=0 "), "no vsock path to host ports: {got}");
    assert_eq!(lines.next().unwrap().unwrap(), "holding");
    // While the guest holds everything: the owner's threads and files stay bounded.
    let threads = count(format!("/proc/{owner}/task"));
    let fds = count(format!("/proc/{owner}/fd"));
    assert!(
        threads <= threads_before + matchlock_sandbox::MAX_VFS_CONNECTIONS,
        "{got}: the owner went from {threads_before} to {threads} threads"
    );
    assert!(fds < 4096 + 256, "{got}: the owner holds {fds} files");
    let files: usize = got.split("files=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(got.ends_with("errno=24"), "the handle budget ends in EMFILE in the guest: {got}");
    assert!((3000..=4096).contains(&files), "up to the budget of 4096 open handles: {got}");
    // Positive controls: exec works during the flood, the workspace once the guest lets go.
    assert_eq!(ok(&h.ml(&["exec", &id, "--", "echo", "during"])), "during\n");
    assert!(flood.wait().unwrap().success());
    let after = h.ml(&["exec", &id, "--", "sh", "-c", "echo y > /workspace/g && cat /workspace/f /workspace/g"]);
    assert_eq!(ok(&after), "xy\n");
    ok(&h.ml(&["kill", &id]));
    ok(&h.ml(&["rm", &id]));
}

/// Bytes under `dir`, recursively.
fn stored_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stored_under(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn a_guest_cannot_store_more_than_its_workspace_quota_on_the_host() {
    let h = home();
    let (shared, lower) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(lower.path().join("keep"), "lower").unwrap();
    std::fs::write(lower.path().join("seed"), vec![1u8; 12 << 20]).unwrap();
    // Writing into a lower file copies it up first, and the copy counts: 12 MiB + 4 fit in 16.
    // Removing the copy frees it. Then both mounts share the one budget: the overlay takes
    // it all, then host_fs gets nothing.
    let script = "dd if=/dev/zero of=/workspace/o/seed bs=1M seek=12 count=8 conv=notrunc 2>&1 | grep -e 'No space' -e 'records out'; \
                  rm /workspace/o/seed; \
                  dd if=/dev/zero of=/workspace/o/big bs=1M count=64 2>&1 | grep -e 'No space' -e 'records out'; \
                  df -m /workspace/o | tail -1 | awk '{print \"size=\" $2}'; \
                  dd if=/dev/zero of=/workspace/h/big bs=1M count=64 2>&1 | grep -e 'No space' -e 'records out'; \
                  rm /workspace/o/big /workspace/h/big; \
                  dd if=/dev/zero of=/workspace/h/after bs=1M count=8 2>/dev/null && echo after-ok; \
                  i=0; while [ $i -lt 3000 ]; do mkdir /workspace/h/d$i 2>/dev/null && ln -s x /workspace/h/s$i 2>/dev/null || break; i=$((i+1)); done; \
                  echo pairs=$i; df -i /workspace/h | tail -1 | awk '{print \"ifree=\" $4}'";
    let out = testnet::run(
        &h,
        &[
            "--image",
            "busybox",
            "--workspace-quota",
            "16",
            "-v",
            &format!("{}:/workspace/o:overlay", lower.path().display()),
            "-v",
            &format!("{}:/workspace/h:host_fs", shared.path().display()),
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let o = stdout(&out);
    let mut lines: Vec<&str> = o.lines().collect();
    assert!(lines[0].contains("No space left on device"), "the copy-up is charged:\n{o}\n{}", stderr(&out));
    assert_eq!(lines[1], "4+0 records out", "12 MiB copied up + 4 MiB written = the quota:\n{o}");
    lines.drain(..2);
    assert!(
        lines[0].contains("No space left on device"),
        "the overlay write stops at the quota:\n{o}\n{}",
        stderr(&out)
    );
    // The new file's name costs one ENTRY_COST (4 KiB), so the 16th MiB no longer fits (a
    // write the quota cannot take whole is refused whole).
    assert_eq!(lines[1], "15+0 records out", "the quota was stored:\n{o}");
    assert_eq!(lines[2], "size=16", "df shows the quota:\n{o}");
    assert!(lines[3].contains("No space left on device"), "host_fs too, not even a name:\n{o}");
    assert!(o.contains("after-ok"), "removals give the space back:\n{o}");
    let listing: Vec<_> = std::fs::read_dir(shared.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(std::fs::metadata(shared.path().join("after")).map(|m| m.len()).ok(), Some(8 << 20), "{listing:?}");
    // Empty directories and symlinks (3000 of each asked for) stop at what is left: 8 MiB
    // less the name `after`, at 4 KiB a name. Each directory takes a block on the host.
    let names = ((8 << 20) - 4096) / 4096;
    assert!(o.contains(&format!("pairs={}", names / 2)), "{o}");
    assert!(o.contains("ifree=0"), "df -i shows no names left:\n{o}");
    assert_eq!(listing.len(), 1 + names, "the host holds the names the quota pays for");
    assert_eq!(stored_under(lower.path()), 5 + (12 << 20), "the overlay's host directory is untouched");
}

/// The bytes of every file in the tar at `path`, by name.
fn tar_files(path: &std::path::Path) -> HashMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut files = HashMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        files.insert(name, data);
    }
    files
}

/// A `docker save` tarball at `out`: the layers of the OCI-layout image `base` (if any),
/// then `layer` on top.
fn image_with_layer(base: Option<&std::path::Path>, layer: Vec<u8>, out: &std::path::Path) {
    let (mut layers, mut config) = (
        Vec::new(),
        serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": []}
        }),
    );
    if let Some(base) = base {
        let files = tar_files(base);
        let blob =
            |digest: &serde_json::Value| files[&format!("blobs/sha256/{}", &digest.as_str().unwrap()[7..])].clone();
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&index["manifests"][0]["digest"])).unwrap();
        config = serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        layers = manifest["layers"].as_array().unwrap().iter().map(|l| blob(&l["digest"])).collect();
    }
    let diff_id = format!("sha256:{}", hex(&<sha2::Sha256 as sha2::Digest>::digest(&layer)));
    config["rootfs"]["diff_ids"].as_array_mut().unwrap().push(diff_id.into());
    layers.push(layer);
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    let names: Vec<String> = (0..layers.len()).map(|i| format!("layer{i}.tar")).collect();
    for (name, data) in names.iter().zip(&layers) {
        add(name, data);
    }
    add("config.json", &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": [], "Layers": names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    b.into_inner().unwrap();
}

/// A layer of one executable file at `path` with the extended attributes `xattrs`.
fn layer_with_xattrs(path: &str, xattrs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let records: Vec<(String, &[u8])> =
        xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice())).collect();
    b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(10);
    b.append_data(&mut h, path, b"#!/bin/sh\n".as_slice()).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn a_crafted_image_runs_nothing_on_the_host_and_ordinary_attributes_reach_the_guest() {
    let h = home();
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("pwned");
    // The reported attack: an ~8.7 KB attribute name whose tail debugfs read as its own
    // script line, starting with `!` (a shell command).
    let name = format!("user.{}!touch {}", "A".repeat(8150), marker.display());
    let evil = work.path().join("evil.tar");
    image_with_layer(None, layer_with_xattrs("bin/tool", &[(name, b"v".to_vec())]), &evil);
    let out = h.import("evil-xattr:1", &evil);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("longer than 255"), "{}", stderr(&out));
    assert!(!marker.exists(), "a command from the image ran on the host");
    assert!(!ok(&h.ml(&["image", "ls"])).contains("evil-xattr"), "a refused image was kept");

    // Positive control: ordinary attributes (a file capability, user.*) arrive in the
    // guest, on top of the Debian image (whose python reads them).
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    let xattrs = [("security.capability".to_owned(), cap.clone()), ("user.origin".to_owned(), b"matchlock".to_vec())];
    let good = work.path().join("good.tar");
    image_with_layer(Some(&common::debian_tarball()), layer_with_xattrs("usr/local/bin/tool", &xattrs), &good);
    ok(&h.import("xattrs:1", &good));
    let read = "import os; p = '/usr/local/bin/tool'; \
        print(os.getxattr(p, 'user.origin').decode(), os.getxattr(p, 'security.capability').hex())";
    let seen = ok(&h.run(&["--image", "xattrs:1", "--", "python3", "-c", read]));
    assert_eq!(seen, format!("matchlock {}\n", hex(&cap)));
    ok(&h.ml(&["image", "rm", "xattrs:1"]));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Probes, as uid 0 in a sandbox, every way the reported escape went: the kernel's knobs
/// (a core_pattern helper runs with every capability outside the command's namespaces),
/// `/sys`, tracing and taking descriptors from other processes, new namespaces, the host
/// channel's port. Prints `name: result` lines.
const ESCAPE_PROBE: &str = r#"
my %name = (1 => "EPERM", 13 => "EACCES", 16 => "EBUSY", 30 => "EROFS", 38 => "ENOSYS");
sub err { my $e = $! + 0; return $name{$e} // "errno $e" }
sub call { my $nr = shift; my $r = syscall($nr, @_); return $r >= 0 ? "ok" : err() }
sub write_to { my ($path, $data) = @_; open(my $f, ">", $path) or return err(); print $f $data; close($f) or return err(); return "ok" }
sub slurp { my ($path) = @_; open(my $f, "<", $path) or return err(); local $/; my $d = <$f>; return $d }
print "core_pattern: ", write_to("/proc/sys/kernel/core_pattern", "|/bin/touch /pwned"), "\n";
my $core = slurp("/proc/sys/kernel/core_pattern"); chomp $core;
print "core_pattern_now: $core\n";
print "sysctl: ", write_to("/proc/sys/vm/drop_caches", "3"), "\n";
print "sysrq: ", write_to("/proc/sysrq-trigger", "h"), "\n";
print "sys: ", (mkdir("/sys/fs/cgroup/escape") ? "ok" : err()), "\n";
my @masked;
for my $p (qw(/proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/interrupts /proc/acpi /sys/firmware)) {
    next unless -e $p;
    if (-d $p) { opendir(my $dh, $p); push @masked, "$p=" . scalar(grep { !/^\.\.?$/ } readdir($dh)) }
    else { push @masked, "$p=" . length(slurp($p)) }
}
print "masked: ", join(" ", @masked), "\n";
print "ptrace: ", call(101, 16, 1, 0, 0), "\n";
my $pidfd = syscall(434, 1, 0);
print "pidfd_open: ", ($pidfd >= 0 ? "ok" : err()), "\n";
print "pidfd_getfd: ", call(438, $pidfd, 0, 0), "\n";
print "userns: ", call(272, 0x10000000), "\n";
my $child = syscall(56, 0x10000000 | 17, 0, 0, 0, 0);
exit 0 if $child == 0;
print "clone_newuser: ", ($child >= 0 ? "ok" : err()), "\n";
print "mount: ", (system("mount -t tmpfs none /mnt 2>/dev/null") == 0 ? "ok" : "denied"), "\n";
my @ports = glob("/dev/vport*");
my %opened = map { my $p = $_; (open(my $f, "+<", $p) ? "ok" : err()) => 1 } @ports;
print "ports: ", scalar(@ports), " ", join(",", sort keys %opened), "\n";
opendir(my $d, "/proc"); my @pids = grep { /^\d+$/ } readdir($d);
print "processes: ", scalar(@pids), "\n";
my ($bnd) = grep { /^CapBnd:/ } split /\n/, slurp("/proc/self/status");
print "capbnd: ", (split /\s+/, $bnd)[1], "\n";
"#;

#[test]
fn a_root_workload_cannot_touch_the_kernels_knobs_the_agent_or_its_port() {
    let h = home();
    let image = debian_image();
    // Positive control first in the same command: a root workload can still install a
    // package, chown, and write its own files.
    let control =
        "set -e; mkdir -p /tmp/pkg/DEBIAN /tmp/pkg/usr/share/ml-hello; echo hi > /tmp/pkg/usr/share/ml-hello/x; \
        printf 'Package: ml-hello\\nVersion: 1\\nArchitecture: all\\nMaintainer: t <t@t.test>\\nDescription: t\\n' \
          > /tmp/pkg/DEBIAN/control; \
        dpkg-deb -b /tmp/pkg /tmp/h.deb >/dev/null; dpkg -i /tmp/h.deb >/dev/null; \
        echo installed: $(dpkg-query -W -f='${Status}' ml-hello); \
        touch /tmp/own; chown nobody:nogroup /tmp/own; echo owner: $(stat -c %U /tmp/own); \
        ulimit -n 16384; echo nofile: $(ulimit -n); \
        perl -e \"$PROBE\"";
    let out = h
        .cmd()
        .env("PROBE", ESCAPE_PROBE)
        .args(["run", "--image", image, "-e", "PROBE", "--", "sh", "-c", control])
        .output()
        .unwrap();
    let seen = reports(&ok(&out));
    let get = |k: &str| seen.get(k).map(String::as_str).unwrap_or_else(|| panic!("no {k}: {seen:?}"));
    assert_eq!(get("installed"), "install ok installed");
    assert_eq!(get("owner"), "nobody");
    assert_eq!(get("nofile"), "16384", "the open-files limit can still be raised");
    assert_eq!(get("core_pattern"), "EROFS", "{seen:?}");
    assert_eq!(get("core_pattern_now"), "core", "the kernel's core_pattern changed");
    assert_eq!(get("sysctl"), "EROFS");
    // Our kernel has no magic SysRq (ENOENT); were it there, it would be read-only.
    assert_ne!(get("sysrq"), "ok", "{seen:?}");
    assert_eq!(get("sys"), "EROFS", "{seen:?}");
    // Those the kernel has are empty (at least /proc/interrupts, so the check is not vacuous).
    let masked: Vec<&str> = get("masked").split(' ').collect();
    assert!(masked.contains(&"/proc/interrupts=0"), "{masked:?}");
    assert!(masked.iter().all(|m| m.ends_with("=0")), "{masked:?}");
    assert_eq!(get("ptrace"), "EPERM");
    assert_eq!(get("pidfd_open"), "ok", "pidfd_open itself is allowed (positive control for the next)");
    assert_eq!(get("pidfd_getfd"), "EPERM");
    assert_eq!((get("userns"), get("clone_newuser")), ("EPERM", "EPERM"));
    assert_eq!(get("mount"), "denied");
    // The port exists in /dev but only guest-init holds it.
    let ports = get("ports");
    assert!(!ports.starts_with("0 ") && !ports.contains("ok"), "the host channel's port: {ports}");
    // Only the command's own PID namespace is visible (its init, sh, perl): not
    // guest-init, the agent or the kernel's threads.
    assert!(get("processes").parse::<u32>().unwrap() <= 3, "{seen:?}");
    assert_eq!(get("capbnd"), "00000000a80425fb", "a default container runtime's capabilities");
    h.assert_no_leftovers();
}

#[test]
fn an_echoing_host_cannot_hand_a_secret_back_transformed_or_in_pieces() {
    use base64::Engine as _;
    let net = testnet();
    let h = home();
    let m = marker("transform");
    let value = format!("sk-Live-{m}-Q7x");
    let script = format!(
        "wget -qO- --header \"Authorization: Bearer $KEY\" http://api.test/transform-echo/{m}; echo ---; \
         wget -qO- --header \"Authorization: Bearer $KEY\" --header 'Range: bytes=0-3' http://api.test/transform-echo/{m}-range 2>&1; echo; echo ---"
    );
    let secret = format!("KEY={value}@api.test");
    let out = testnet::run(&h, &["--image", "busybox", "--secret", &secret, "--", "sh", "-c", &script]);
    let seen = stdout(&out);
    let (echoed, ranged) = seen.split_once("---").unwrap_or_else(|| panic!("{seen}\n{}", stderr(&out)));
    // The server really received the value (positive control) and echoed it in every form.
    let got = net.requests_with(&format!("/transform-echo/{m}"));
    assert_eq!(got[0]["headers"]["authorization"].as_str(), Some(format!("Bearer {value}").as_str()));
    assert_eq!(echoed.trim().lines().count(), 10, "{echoed}");
    // None of the forms reached the guest: each became the placeholder.
    let bytes = value.as_bytes();
    let mut forms = vec![value.to_lowercase(), value.to_uppercase(), hex(bytes), hex(bytes).to_uppercase()];
    for engine in [base64::engine::general_purpose::STANDARD_NO_PAD, base64::engine::general_purpose::URL_SAFE_NO_PAD] {
        forms.push(engine.encode(bytes));
    }
    for form in &forms {
        assert!(
            !echoed.to_lowercase().contains(&form.to_lowercase()[4..form.len() - 4]),
            "{form} reached the guest:\n{echoed}"
        );
    }
    assert_eq!(echoed.matches("SANDBOX_SECRET_").count(), 10, "each line scrubbed to the placeholder:\n{echoed}");
    // A Range request carrying the secret is refused before it leaves the host.
    assert!(ranged.contains("403"), "{ranged}");
    assert!(net.requests_with(&format!("/transform-echo/{m}-range")).is_empty(), "the range request left the host");

    // With --allow-secret-ranges it goes out and is answered (the user accepted that risk;
    // busybox wget reports a 206 as an error).
    let allowed = testnet::run(
        &h,
        &["--image", "busybox", "--secret", &secret, "--allow-secret-ranges", "--", "sh", "-c", &script],
    );
    assert!(stdout(&allowed).contains("206 Partial Content"), "{}", stdout(&allowed));
    let ranged = net.requests_with(&format!("/transform-echo/{m}-range"));
    assert_eq!(ranged.len(), 1, "the allowed range request reached the host");
    assert_eq!(ranged[0]["headers"]["range"].as_str(), Some("bytes=0-3"));
}
