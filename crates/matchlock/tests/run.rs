//! `matchlock run` against real VMs: real kernel, QEMU, vsock, image layers.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{debian_image, home, ok, stderr, stdout};

#[test]
fn streams_stdout_and_stderr_and_propagates_the_exit_code() {
    let h = home();
    let out = h.run(&["--image", "busybox", "--", "sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "hello\n");
    assert!(stderr(&out).ends_with("oops\n"), "stderr: {}", stderr(&out));
}

#[test]
fn exit_codes_zero_one_255_and_signals() {
    let h = home();
    for (cmd, code) in [("true", 0), ("exit 1", 1), ("exit 255", 255), ("kill -9 $$", 137), ("kill -TERM $$", 143)] {
        let out = h.run(&["--image", "busybox", "--", "sh", "-c", cmd]);
        assert_eq!(out.status.code(), Some(code), "{cmd}: {}", stderr(&out));
    }
    // SIGPIPE is at its default, as under Docker: a writer into a closed pipe dies of it
    // (141) instead of failing with EPIPE ("yes: Broken pipe").
    let out = h.run(&["--image", "busybox", "--", "sh", "-c", "(yes; echo \"yes ended: $?\" >&2) | head -n1"]);
    assert_eq!((ok(&out), stderr(&out)), ("y\n".to_owned(), "yes ended: 141\n".to_owned()));
}

#[test]
fn large_output_is_byte_exact() {
    let h = home();
    let out = h.run(&["--image", "busybox", "--", "seq", "1", "100000"]);
    let expected: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    let got = ok(&out);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "output differs");
}

#[test]
fn stdin_is_forwarded_with_eof_in_pipe_mode() {
    let h = home();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut child = h
        .cmd()
        .args(["run", "-i", "--image", "busybox", "--", "sh", "-c", "cat; echo END >&2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn({
        let data = data.clone();
        move || {
            stdin.write_all(&data).unwrap();
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    h.assert_no_leftovers();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert!(out.stdout == data, "stdin did not round-trip ({} of {} bytes)", out.stdout.len(), data.len());
    assert!(stderr(&out).ends_with("END\n"));
}

#[test]
fn without_i_stdin_is_empty() {
    let h = home();
    let mut child = h
        .cmd()
        .args(["run", "--image", "busybox", "--", "sh", "-c", "wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"not forwarded").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(ok(&out).trim(), "0");
}

#[test]
fn tty_session_through_a_pty() {
    let h = home();
    let mut cmd = h.cmd();
    cmd.args(["run", "-it", "--image", "busybox", "sh"]);
    let (mut child, mut master) = common::spawn_in_pty(cmd, 33, 101);
    let reader = common::read_until(&master, "tty-1-done");
    master.write_all(b"echo $((6*7)); tty; stty size; echo tty-$((1+0))-done; exit 7\r").unwrap();
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    h.assert_no_leftovers();
    assert_eq!(status.code(), Some(7), "output: {out}");
    assert!(out.contains("42"), "output: {out}");
    assert!(out.contains("/dev/pts/"), "not a terminal: {out}");
    assert!(out.contains("33 101"), "window size not propagated: {out}");
}

#[test]
fn env_precedence_image_then_env_file_then_flags() {
    let h = home();
    let env_file = h.dir.path().join("env");
    std::fs::write(&env_file, "# comment\n\nFOO=file\nBAZ=file\nHOST_ONLY\n").unwrap();
    let out = h
        .cmd()
        .env("HOST_ONLY", "from-host")
        .env("FROM_FLAG", "flag-host")
        .args(["run", "--image", "layered", "--entrypoint", "sh", "--env-file"])
        .arg(&env_file)
        .args(["-e", "FOO=flag", "-e", "FROM_FLAG", "--", "-c", "echo $FOO $BAR $BAZ $HOST_ONLY $FROM_FLAG"])
        .output()
        .unwrap();
    h.assert_no_leftovers();
    assert_eq!(ok(&out), "flag image file from-host flag-host\n");
}

#[test]
fn user_switching_by_name_uid_and_pair() {
    let h = home();
    let out = h.run(&[
        "--image",
        "busybox",
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "id -u; id -g; echo $HOME; touch /root/x 2>/dev/null && echo wrote || echo denied",
    ]);
    assert_eq!(ok(&out), "65534\n65534\n/nonexistent\ndenied\n");
    assert_eq!(ok(&h.run(&["--image", "busybox", "-u", "65534", "--", "id", "-u"])), "65534\n");
    assert_eq!(ok(&h.run(&["--image", "busybox", "-u", "65534:65534", "--", "id", "-g"])), "65534\n");
    assert_eq!(ok(&h.run(&["--image", "busybox", "--", "sh", "-c", "id -u; echo $HOME"])), "0\n/root\n");
    let unknown = h.run(&["--image", "busybox", "-u", "ghost", "--", "true"]);
    assert_eq!(unknown.status.code(), Some(127));
    assert!(stderr(&unknown).contains("unable to find user ghost"), "{}", stderr(&unknown));
}

#[test]
fn image_user_and_workdir_apply_and_flags_override_them() {
    let h = home();
    assert_eq!(ok(&h.run(&["--image", "nonroot", "--", "sh", "-c", "id -u; pwd"])), "65534\n/tmp\n");
    assert_eq!(
        ok(&h.run(&["--image", "nonroot", "-u", "0", "-w", "/etc", "--", "sh", "-c", "id -u; pwd"])),
        "0\n/etc\n"
    );
    assert_eq!(ok(&h.run(&["--image", "busybox", "--", "pwd"])), "/\n");
}

#[test]
fn entrypoint_and_cmd_compose_like_docker() {
    let h = home();
    assert_eq!(ok(&h.run(&["--image", "layered"])), "entry from-cmd\n");
    assert_eq!(ok(&h.run(&["--image", "layered", "--", "a", "b"])), "entry a b\n");
    assert_eq!(ok(&h.run(&["--image", "layered", "--entrypoint", "/bin/echo", "--", "x"])), "x\n");
    assert_eq!(ok(&h.run(&["--image", "layered", "--entrypoint", "", "--", "echo", "y"])), "y\n");
}

#[test]
fn image_filesystem_metadata_and_whiteouts_survive() {
    let h = home();
    let script = "readlink /bin/sh; stat -c %u:%g /etc/passwd; stat -c %a /etc/shadow; stat -c %a /bin/busybox; \
        test -e /data/gone && echo gone-present || echo gone-deleted; ls /data/dir; \
        stat -c %i /data/keep /data/hardlink | uniq | wc -l; stat -c %a /data/suid; stat -c '%F %t:%T' /data/null; \
        cat /data/link; cat /etc/os-release | head -1";
    let out = ok(&h.run(&["--image", "layered", "--entrypoint", "sh", "--", "-c", script]));
    assert_eq!(
        out,
        "busybox\n0:0\n640\n755\ngone-deleted\nnew\n1\n4755\ncharacter special file 1:3\nkept\nNAME=\"matchlock busybox\"\n"
    );
}

#[test]
fn an_image_with_more_layers_than_virtio_slots_boots() {
    let h = home();
    ok(&h.import("many", &common::fixture("many.tar")));
    let out = ok(&h.run(&["--image", "many", "--", "sh", "-c", "ls /layers | wc -l; cat /layers/10"]));
    assert_eq!(out, "11\nlayer 10\n");
}

#[test]
fn writes_stay_inside_the_vm() {
    let h = home();
    ok(&h.run(&["--image", "busybox", "--", "sh", "-c", "echo changed > /etc/os-release; rm /bin/ls"]));
    let out = ok(&h.run(&[
        "--image",
        "busybox",
        "--",
        "sh",
        "-c",
        "cat /etc/os-release; test -e /bin/ls && echo ls-present",
    ]));
    assert_eq!(out, "NAME=\"matchlock busybox\"\nID=matchlock-busybox\nls-present\n");
}

#[test]
fn machine_identity_files_and_cpu_quota() {
    let h = home();
    let out = h.run(&[
        "--image",
        "busybox",
        "--hostname",
        "override.internal",
        "--add-host",
        "api.internal:10.0.0.10",
        "--add-host",
        "db.internal:10.0.0.11",
        "--dns-servers",
        "1.1.1.1,1.0.0.1",
        "--cpus",
        "0.5",
        "--",
        "sh",
        "-c",
        "hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf /sys/fs/cgroup/init/cpu.max; date +%Y",
    ]);
    let year = std::process::Command::new("date").arg("+%Y").output().unwrap();
    let expected = format!(
        "override.internal\noverride.internal\n127.0.0.1 localhost localhost.localdomain override.internal\n\
         10.0.0.10 api.internal\n10.0.0.11 db.internal\n::1 localhost ip6-localhost ip6-loopback\n\
         ff02::1 ip6-allnodes\nff02::2 ip6-allrouters\nnameserver 1.1.1.1\nnameserver 1.0.0.1\n50000 100000\n{}",
        String::from_utf8_lossy(&year.stdout)
    );
    assert_eq!(ok(&out), expected);
    let out = ok(&h.run(&["--image", "busybox", "--", "sh", "-c", "hostname; cat /etc/resolv.conf"]));
    assert!(out.starts_with("vm-"), "{out}");
    assert!(out.contains("nameserver 8.8.8.8\nnameserver 8.8.4.4\n"), "{out}");
}

#[test]
fn a_cold_booted_guest_has_a_seeded_rng_before_its_first_command() {
    // The host answers the guest's ready signal with entropy. Without it the kernel is
    // still gathering jitter entropy when the first command runs: a non-blocking
    // getrandom fails with EAGAIN, and a blocking one (every Python start) waits ~1 s.
    // PYTHONHASHSEED keeps Python's own start from waiting for it first.
    let h = home();
    let probe = "import os; os.getrandom(16, os.GRND_NONBLOCK); print('seeded')";
    let out = h.run(&["--cold", "--image", debian_image(), "-e", "PYTHONHASHSEED=0", "--", "python3", "-c", probe]);
    assert_eq!(ok(&out), "seeded\n");
}

#[test]
fn ctrl_c_stops_the_command_quickly_and_leaves_nothing() {
    let h = home();
    let mut child = h.spawn(&["run", "--image", "busybox", "--", "sh", "-c", "echo started; sleep 60"]);
    let mut first = [0u8; 8];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let sent = Instant::now();
    common::signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(status.code(), Some(143), "sleep should die of SIGTERM");
    h.assert_no_leftovers();
}

#[test]
fn ctrl_c_during_boot_aborts_and_leaves_nothing() {
    let h = home();
    let child = h.spawn(&["run", "--image", "busybox", "--", "true"]);
    // Wait until QEMU is up, i.e. the guest is booting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.processes().iter().any(|c| c.contains("qemu-system")) {
        assert!(Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    common::signal(&child, nix::sys::signal::Signal::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("while booting"), "{}", stderr(&out));
    h.assert_no_leftovers();
}

#[test]
fn a_vm_that_dies_mid_command_is_an_error_and_leaves_nothing() {
    let h = home();
    let mut child = h.spawn(&["run", "--image", "busybox", "--", "sh", "-c", "echo before; sleep 30"]);
    let mut first = [0u8; 7];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"before\n");
    let qemu: Vec<i32> =
        h.pids().into_iter().filter(|(_, cmdline)| cmdline.contains("qemu-system")).map(|(pid, _)| pid).collect();
    assert_eq!(qemu.len(), 1, "expected one QEMU for this sandbox");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("sandbox VM stopped"), "{}", stderr(&out));
    h.assert_no_leftovers();
}

#[test]
fn commands_are_hardened_unless_privileged() {
    let h = home();
    let probe = "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t' ' '; \
        mkdir -p /tmp/m; mount -t tmpfs none /tmp/m 2>/dev/null && echo mounted || echo mount-denied; \
        reboot -f 2>/dev/null; echo still-here";
    let out = ok(&h.run(&["--image", "busybox", "--", "sh", "-c", probe]));
    let field = |name: &str| {
        out.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_else(|| panic!("{out}")).to_owned()
    };
    let bounding = u64::from_str_radix(&field("CapBnd"), 16).unwrap();
    // A default container runtime's set: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID,
    // SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
    assert_eq!(bounding, 0xa804_25fb, "{out}");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    assert!(out.contains("mount-denied\nstill-here\n"), "{out}");

    // --privileged keeps everything; reboot(2) then ends only the command's PID
    // namespace (as if by SIGHUP): the VM and its agent live on and report it.
    let out = h.run(&["--privileged", "--image", "busybox", "--", "sh", "-c", probe]);
    assert_eq!(out.status.code(), Some(129), "{}", stderr(&out));
    assert!(stdout(&out).contains("Seccomp: 0") && stdout(&out).contains("mounted"), "{}", stdout(&out));
    assert!(!stderr(&out).contains("VM stopped"), "{}", stderr(&out));
}

#[test]
fn bad_input_gives_clear_errors_and_exit_1() {
    let h = home();
    let cases: [(&[&str], &str); 5] = [
        (&["--image", "no-such-image", "--", "true"], "cannot pull no-such-image"),
        (&["--", "true"], "--image"),
        (&["--image", "busybox", "-e", "MATCHLOCK_SURELY_UNSET_VAR", "--", "true"], "invalid environment variable"),
        (&["--image", "busybox", "--add-host", "invalid-spec", "--", "true"], "invalid add-host mapping"),
        (&["--image", "busybox", "--cpus", "0", "--", "true"], "--cpus must be positive"),
    ];
    for (args, message) in cases {
        let out = h.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    let out = h.run(&["--image", "busybox", "-e", "MATCHLOCK_SURELY_UNSET_VAR", "--", "true"]);
    assert!(stderr(&out).contains("MATCHLOCK_SURELY_UNSET_VAR"));
}

#[test]
fn corrupt_import_is_rejected_and_stores_nothing() {
    let h = home();
    let good = std::fs::read(common::shared().fixtures.join("busybox.tar")).unwrap();
    let truncated = h.dir.path().join("truncated.tar");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let garbage = h.dir.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tarball at all").unwrap();
    for (tag, file) in [("broken-a", &truncated), ("broken-b", &garbage)] {
        let out = h.import(tag, file);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("cannot import"), "{}", stderr(&out));
        assert!(!stdout(&h.ml(&["image", "ls"])).contains(tag), "a failed import left an image");
    }
}
