//! `matchlock build` on real VMs: a multi-stage Dockerfile becomes an image that runs like
//! any other, checked in what the host stored (the exported layers and config); the step
//! cache hits and misses as the context changes; a failing or interrupted step leaves
//! nothing behind; secrets reach `RUN` steps as placeholders only; bad input names its line.

mod common;
mod testnet;

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{home, isolated_home, ok, stderr, stdout, Home};

/// A context directory with `files` (`path`, content).
fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

fn build(h: &Home, ctx: &Path, args: &[&str]) -> Output {
    h.cmd().arg("build").args(args).arg(ctx).output().expect("run matchlock build")
}

/// `image export` of `tag`: the archive's files by name, and its manifest.
fn export_files(h: &Home, tag: &str) -> (std::collections::HashMap<String, Vec<u8>>, serde_json::Value) {
    let out = tempfile::NamedTempFile::new().unwrap();
    ok(&h.ml(&["image", "export", tag, "-o", &out.path().to_string_lossy()]));
    let mut files = std::collections::HashMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(out.path()).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        files.insert(name, data);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    (files, manifest)
}

/// The regular files in the layers of `tag` as stored: path → (mode, content).
fn layer_files(h: &Home, tag: &str) -> std::collections::HashMap<String, (u32, Vec<u8>)> {
    let (files, manifest) = export_files(h, tag);
    let mut found = std::collections::HashMap::new();
    for layer in manifest[0]["Layers"].as_array().unwrap() {
        for entry in tar::Archive::new(files[layer.as_str().unwrap()].as_slice()).entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.header().entry_type().is_file() {
                let (name, mode) =
                    (entry.path().unwrap().to_string_lossy().into_owned(), entry.header().mode().unwrap());
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                found.insert(name, (mode, data));
            }
        }
    }
    found
}

/// `image export` of `tag`: its config file, and the entry names of each layer.
fn exported(h: &Home, tag: &str) -> (serde_json::Value, Vec<Vec<String>>) {
    let (files, manifest) = export_files(h, tag);
    let config: serde_json::Value = serde_json::from_slice(&files[manifest[0]["Config"].as_str().unwrap()]).unwrap();
    let layers = manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mut names: Vec<String> = tar::Archive::new(files[l.as_str().unwrap()].as_slice())
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().to_string_lossy().trim_end_matches('/').to_owned())
                .collect();
            names.sort();
            names
        })
        .collect();
    (config, layers)
}

fn cached_steps(out: &Output) -> usize {
    stderr(out).lines().filter(|l| l.starts_with("CACHED [")).count()
}

/// Files of the image store's temporary directory and the root file systems it holds.
fn store_scratch(h: &Home) -> (Vec<String>, usize) {
    let tmp: Vec<String> = std::fs::read_dir(h.cache_dir().join("images/tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let rootfs = std::fs::read_dir(h.blobs_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
        .count();
    (tmp, rootfs)
}

const MULTI_STAGE: &str = r#"ARG BASE=busybox
FROM ${BASE} AS build
ARG MARK
ARG FLAVOR=plain
ENV OUT=/out PATH=/out/bin:$PATH
WORKDIR $OUT
RUN mkdir pre && echo pre > pre/file
COPY app/ ./app/
RUN mkdir bin && printf '#!/bin/sh\necho tool-%s\n' "$FLAVOR" > bin/tool && chmod 755 bin/tool \
    && touch scratch && echo "$MARK" > mark
RUN rm scratch /bin/vi && tool > made-by-tool && cat app/main.sh pre/file > from-copy
USER nobody
WORKDIR /tmp
RUN id -u > /tmp/uid && pwd > /tmp/pwd && touch /tmp/as-nobody

FROM busybox
ARG MARK
LABEL org.example.mark=$MARK
COPY --from=build --chown=nobody --chmod=750 /out /app
COPY --from=build /tmp/uid /tmp/pwd /ids/
EXPOSE 8080
ENV PATH=/app/bin:$PATH
WORKDIR /srv/www
CMD ["tool"]
"#;

#[test]
fn a_multi_stage_build_runs_like_any_image_and_its_cache_follows_the_context() {
    let h = home();
    let m = format!("m{}", std::process::id());
    let ctx = context(&[
        ("Dockerfile", MULTI_STAGE),
        (".dockerignore", "**/*.log\nsecret/\n"),
        ("app/main.sh", "echo main\n"),
        ("app/debug.log", "noise\n"),
        ("secret/key", "do-not-ship\n"),
    ]);
    let tag = format!("built-{m}:1");
    let mark = format!("--build-arg=MARK={m}");
    let first = build(&h, ctx.path(), &["-t", &tag, &mark, "--build-arg", "FLAVOR=fancy"]);
    let out = ok(&first);
    assert!(out.contains(&format!("Successfully built and tagged {tag}")), "{out}");
    assert!(out.contains("Layers: 4"), "busybox, two COPY layers, the WORKDIR: {out}");
    assert_eq!(cached_steps(&first), 0, "{}", stderr(&first));
    assert!(!stderr(&first).contains("booting anew"), "the COPY went into the running VM: {}", stderr(&first));
    assert!(stderr(&first).contains("[build 8/12] RUN mkdir bin"), "{}", stderr(&first));
    h.assert_no_leftovers();

    // The image runs its CMD, found on the ENV PATH it set.
    assert_eq!(ok(&h.run(&["--image", &tag])).trim(), "tool-fancy");
    let probe = "ls /app; ls /app/app; cat /app/from-copy /app/mark /ids/uid /ids/pwd; stat -c '%U %a' /app/bin/tool /app/mark; \
                 test -e /app/scratch || echo no-scratch; test -e /bin/vi && echo final-has-vi";
    let seen = ok(&h.run(&["--image", &tag, "--", "sh", "-c", probe]));
    let expected = format!(
        "app\nbin\nfrom-copy\nmade-by-tool\nmark\npre\nmain.sh\necho main\npre\n{m}\n65534\n/tmp\nnobody 750\nnobody 750\nno-scratch\nfinal-has-vi\n"
    );
    assert_eq!(seen, expected, "USER/WORKDIR reached the later RUN, .dockerignore kept debug.log out");

    // What the host stored: the config, and layers without the ignored files.
    let (config, layers) = exported(&h, &tag);
    assert_eq!(config["config"]["Labels"]["org.example.mark"], m.as_str());
    assert!(config["config"]["ExposedPorts"]["8080/tcp"].is_object(), "{config}");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["tool"]));
    assert!(
        config["config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "PATH=/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "{config}"
    );
    let copied = &layers[1];
    assert!(copied.contains(&"app/app/main.sh".to_owned()), "{copied:?}");
    assert!(!copied.iter().any(|n| n.contains("debug.log") || n.contains("secret")), "{copied:?}");
    assert_eq!(layers[2], ["ids/pwd", "ids/uid"]);
    assert_eq!(layers[3], ["srv/www"], "a WORKDIR no RUN created is made");
    assert_eq!(ok(&h.run(&["--image", &tag, "--", "pwd"])), "/srv/www\n");

    // The build stage alone (its steps all cached): whiteouts for what a later step removed.
    let stage_tag = format!("built-{m}:stage");
    let stage = build(&h, ctx.path(), &["-t", &stage_tag, &mark, "--build-arg", "FLAVOR=fancy", "--target", "build"]);
    ok(&stage);
    assert_eq!(cached_steps(&stage), 5, "{}", stderr(&stage));
    let (_, stage_layers) = exported(&h, &stage_tag);
    let removing =
        stage_layers.iter().find(|l| l.contains(&"out/made-by-tool".to_owned())).expect("the second RUN's layer");
    assert!(
        removing.contains(&"bin/.wh.vi".to_owned()) && removing.contains(&"out/.wh.scratch".to_owned()),
        "{removing:?}"
    );
    assert!(
        !removing.contains(&"out/bin/tool".to_owned()),
        "a step layer holds only that step's changes: {removing:?}"
    );
    // The RUN after the COPY ran in the VM that had run the RUN before it, with the copied
    // files unpacked into it: its layer holds neither of theirs.
    let after_copy = stage_layers.iter().find(|l| l.contains(&"out/bin/tool".to_owned())).expect("its layer");
    assert!(!after_copy.iter().any(|n| n.starts_with("out/app") || n.starts_with("out/pre")), "{after_copy:?}");
    let gone = ok(&h.run(&["--image", &stage_tag, "--", "sh", "-c", "test -e /bin/vi || echo vi-gone; ls /out"]));
    assert_eq!(gone, "vi-gone\napp\nbin\nfrom-copy\nmade-by-tool\nmark\npre\n");

    // An ignored file changes: everything is cached. A copied file changes: nothing is.
    std::fs::write(ctx.path().join("app/debug.log"), "more noise\n").unwrap();
    let again = build(&h, ctx.path(), &["-t", &tag, &mark, "--build-arg", "FLAVOR=fancy"]);
    ok(&again);
    assert_eq!(cached_steps(&again), 7, "{}", stderr(&again));
    std::fs::write(ctx.path().join("app/main.sh"), "echo changed\n").unwrap();
    let changed = build(&h, ctx.path(), &["-t", &tag, &mark, "--build-arg", "FLAVOR=fancy"]);
    ok(&changed);
    assert_eq!(cached_steps(&changed), 1, "only the RUN before the COPY: {}", stderr(&changed));
    assert_eq!(ok(&h.run(&["--image", &tag, "--", "cat", "/app/app/main.sh"])), "echo changed\n");
    h.assert_no_leftovers();
}

#[test]
fn a_failing_or_interrupted_step_leaves_nothing_behind() {
    // A store of its own: what the build leaves in it is all there is.
    let h = isolated_home();
    ok(&h.import("busybox", &common::fixture("busybox.tar")));
    let m = format!("f{}", std::process::id());
    let before = store_scratch(&h);
    let ctx = context(&[
        (
            "Dockerfile",
            &format!("FROM busybox\nCOPY a.txt /a.txt\nRUN echo output-{m} && cat /a.txt && exit 3\nRUN true\n"),
        ),
        ("a.txt", "from-context\n"),
    ]);
    let failed = build(&h, ctx.path(), &["-t", "never:1"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    let e = stderr(&failed);
    assert!(e.contains("[3/4] RUN echo") && e.contains("Dockerfile line 3") && e.contains("exit code 3"), "{e}");
    assert!(e.contains(&format!("its output ended with:\noutput-{m}\nfrom-context")), "{e}");
    assert!(!stdout(&failed).contains("Successfully"), "{}", stdout(&failed));
    h.assert_no_leftovers();
    assert!(!ok(&h.ml(&["image", "ls"])).contains("never"), "no image of a failed build");
    assert_eq!(store_scratch(&h), before, "no spool, no hidden root file system is left");

    // Ctrl-C in the middle of a RUN.
    let ctx = context(&[("Dockerfile", &format!("FROM busybox\nRUN echo started-{m} && sleep 120\n"))]);
    let mut child = h
        .cmd()
        .args(["build", "-t", "never:2"])
        .arg(ctx.path())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let marker = format!("started-{m}");
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(&marker) && !line.contains("RUN") {
            break;
        }
    }
    assert!(seen.contains(&marker), "the RUN never started: {seen}");
    let sent = Instant::now();
    common::signal(&child, nix::sys::signal::Signal::SIGINT);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(sent.elapsed() < Duration::from_secs(30), "took {:?} to stop", sent.elapsed());
    assert!(!status.success());
    assert!(rest.join("\n").contains("interrupted"), "{rest:?}");
    h.assert_no_leftovers();
    assert_eq!(store_scratch(&h), before);
}

#[test]
fn run_steps_see_secret_placeholders_and_no_layer_holds_a_value() {
    let h = home();
    let m = format!("s{}", std::process::id());
    let value = format!("real-value-{m}");
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo \"token=$TOKEN\" > /token\n")]);
    let tag = format!("secretive-{m}:1");
    let secret = format!("TOKEN={value}@api.test");
    let quiet = build(&h, ctx.path(), &["-q", "-t", &tag, "--secret", &secret]);
    assert!(ok(&quiet).contains(&format!("Successfully built and tagged {tag}")));
    assert!(!stderr(&quiet).contains("RUN echo"), "--quiet shows no steps: {}", stderr(&quiet));
    let token = ok(&h.run(&["--image", &tag, "--", "cat", "/token"]));
    let placeholder = token.trim().strip_prefix("token=").unwrap().to_owned();
    assert!(placeholder.starts_with("SANDBOX_SECRET_"), "{token}");
    let grep = |needle: &str| {
        std::process::Command::new("grep")
            .args(["-rlaF", needle])
            .arg(h.blobs_dir())
            .arg(h.dir.path())
            .output()
            .unwrap()
    };
    // Positive control: the placeholder is found in the stored layer.
    assert!(!stdout(&grep(&placeholder)).is_empty(), "grep finds what a layer holds");
    let found = stdout(&grep(&value));
    assert!(found.is_empty(), "the secret value was stored: {found}");
}

#[test]
fn bad_input_gets_a_clear_error_naming_its_line() {
    let h = home();
    let cases: [(&str, &[&str], &str); 5] = [
        ("FROM busybox\nRUN true\nFROBNICATE now\n", &[], "Dockerfile line 3"),
        ("FROM busybox\nCOPY nothere.txt /x\n", &[], "Dockerfile line 2"),
        (
            "FROM busybox AS a\nCOPY --from=b /x /y\nFROM busybox AS b\n",
            &[],
            "Dockerfile line 2: --from=b: that stage comes later",
        ),
        ("FROM busybox AS a\n", &["--target", "nope"], "target stage \"nope\" could not be found"),
        ("FROM busybox\nRUN --network=none true\n", &[], "Dockerfile line 2: RUN --network is not supported"),
    ];
    for (dockerfile, extra, want) in cases {
        let ctx = context(&[("Dockerfile", dockerfile)]);
        let mut args = vec!["-t", "bad:1"];
        args.extend_from_slice(extra);
        let out = build(&h, ctx.path(), &args);
        assert!(!out.status.success(), "{dockerfile:?} built");
        assert!(stderr(&out).contains(want), "{dockerfile:?}: {}", stderr(&out));
    }
    let ctx = context(&[("Dockerfile", "FROM busybox\nCOPY nothere.txt /x\n")]);
    let missing = stderr(&build(&h, ctx.path(), &["-t", "bad:1"]));
    assert!(missing.contains("nothere.txt: not found in the build context"), "{missing}");
    let untagged = h.ml(&["build", &ctx.path().to_string_lossy()]);
    assert!(
        stderr(&untagged).contains("-t/--tag is required when building from a Dockerfile"),
        "{}",
        stderr(&untagged)
    );
    let nowhere = h.ml(&["build", "-t", "x:1", "/nonexistent-context"]);
    assert!(stderr(&nowhere).contains("is not a directory"), "{}", stderr(&nowhere));
    h.assert_no_leftovers();
}

/// `ADD <url>` is fetched by the host under the build's network policy, as a `RUN` step's
/// request would be: the served bytes land as Docker lands them; a host outside the
/// allow-list, `--no-network`, a redirect to a host outside it, and names of the host itself
/// are refused before anything is sent there (the test servers' own logs); no secret is sent;
/// the same content is cached, changed content is not.
#[test]
fn add_of_a_url_is_fetched_under_the_builds_network_policy() {
    let net = testnet::testnet();
    let h = home();
    let m = testnet::marker("add");
    let build_net = |dockerfile: &str, args: &[&str]| -> Output {
        let ctx = context(&[("Dockerfile", dockerfile)]);
        let mut cmd = testnet::cmd(&h);
        cmd.args(["build", "--dns-servers", testnet::DNS]).args(args).arg(ctx.path());
        cmd.output().expect("run matchlock build")
    };
    let tag = format!("add-{m}:1");
    let n = 300_000;
    let dockerfile = format!(
        "FROM scratch\nADD http://api.test/bytes?n={n}&m={m} /dl/\n\
         ADD --chmod=755 https://api.test/echo?m={m}-tls /etc/echo.json\n"
    );
    let value = format!("value-{m}");
    let policy = ["--allow-host", "api.test", "--secret", &format!("ADD_KEY={value}@api.test")];
    let args = [["-t", tag.as_str()].as_slice(), &policy].concat();
    ok(&build_net(&dockerfile, &args));
    let files = layer_files(&h, &tag);
    let (mode, data) = &files["dl/bytes"];
    assert_eq!((*mode, data.len()), (0o600, n), "Docker's mode, the file named from the URL");
    assert!(data.iter().all(|&b| b == b'x'), "the served bytes");
    let (mode, echo) = &files["etc/echo.json"];
    let echo: serde_json::Value = serde_json::from_slice(echo).unwrap();
    assert_eq!((*mode, echo["tls"].as_bool(), echo["host"].as_str()), (0o755, Some(true), Some("api.test")));
    let received = net.requests_with(&m);
    assert_eq!(received.len(), 2, "{received:?}");
    for request in &received {
        assert_eq!(request["server"], testnet::API);
        let text = request.to_string();
        assert!(!text.contains(&value) && !text.contains("SANDBOX_SECRET"), "a secret was sent: {text}");
    }
    // The same content again: both steps are cached (they are fetched again to know).
    let again = build_net(&dockerfile, &args);
    ok(&again);
    assert_eq!(cached_steps(&again), 2, "{}", stderr(&again));
    assert_eq!(net.requests_with(&m).len(), 4);
    // A remote file that changed misses the cache.
    let changing = format!("FROM scratch\nADD http://api.test/changing?m={m}-g /stamp\n");
    let tag_changing = format!("add-changing-{m}:1");
    let args = [["-t", tag_changing.as_str()].as_slice(), &policy].concat();
    ok(&build_net(&changing, &args));
    let first = layer_files(&h, &tag_changing)["stamp"].1.clone();
    let again = build_net(&changing, &args);
    ok(&again);
    assert_eq!(cached_steps(&again), 0, "{}", stderr(&again));
    assert_ne!(layer_files(&h, &tag_changing)["stamp"].1, first, "the new content is in the image");

    // Refused before anything is sent: a host outside the allow-list (not even resolved),
    // no network, a redirect out of the allow-list, names of the host itself and loopback.
    let refused = [
        (format!("http://{m}-a.glob.test/echo?m={m}-a"), &["--allow-host", "api.test"][..], "is not in the allow-list"),
        (format!("http://api.test/echo?m={m}-b"), &["--no-network"][..], "--no-network"),
        (
            format!("http://api.test/redirect?to=http://other.test/echo%3Fm%3D{m}-c"),
            &["--allow-host", "api.test"][..],
            "http://other.test/echo?m=",
        ),
        (format!("http://hostself.test/echo?m={m}-d"), &["--allow-host", "hostself.test"][..], "belongs to the host"),
        (format!("http://rebind.test/echo?m={m}-e"), &[][..], "127.0.0.1 is private or reserved"),
        (format!("http://api.test/bytes?n=2000000&m={m}-f"), &["--build-disk", "1"][..], "larger than 1048576 bytes"),
    ];
    for (url, flags, want) in &refused {
        let bad = format!("bad-{m}:1");
        let out =
            build_net(&format!("FROM scratch\nADD {url} /x\n"), &[["-t", bad.as_str()].as_slice(), flags].concat());
        let err = stderr(&out);
        assert!(!out.status.success(), "{url} {flags:?} was fetched");
        assert!(err.contains("(Dockerfile line 2)") && err.contains(want), "{url} {flags:?}: {err}");
        assert!(!stdout(&h.ml(&["image", "ls"])).contains(&format!("bad-{m}")), "an image was made");
    }
    let other_hits: Vec<_> = net.requests().into_iter().filter(|r| r["server"] == testnet::OTHER).collect();
    for suffix in ["a", "b", "c", "d", "e"] {
        let marker = format!("{m}-{suffix}");
        let at_api = net.requests_with(&marker).into_iter().filter(|r| r["server"] == testnet::API).count();
        // Positive control: the redirect's first hop reached api.test; nothing else did.
        assert_eq!(at_api, usize::from(suffix == "c"), "{marker}");
        assert!(!other_hits.iter().any(|r| r.to_string().contains(&marker)), "other.test received {marker}");
    }
    assert!(!net.log("dnsmasq.log").contains(&format!("{m}-a")), "a refused name was resolved");
    assert!(net.log("dnsmasq.log").contains("hostself.test"), "positive control: allowed names are resolved");
    h.assert_no_leftovers();
}

/// Names of the layer blobs in `h`'s store.
fn layer_blobs(h: &Home) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(h.blobs_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".layer") || n.ends_with(".ext4"))
        .collect()
}

#[test]
fn a_builds_disk_use_is_bounded_and_gc_reclaims_all_of_it() {
    // A store of its own: what the build leaves in it is all there is.
    let h = isolated_home();
    ok(&h.import("busybox", &common::fixture("busybox.tar")));
    let before = layer_blobs(&h);
    let (tmp_before, _) = store_scratch(&h);

    // A 2 GB sparse file in the context: its layer would be 2 GB of real bytes. The step
    // fails at the build's disk size, with the step, its line and why; nothing is spooled.
    let ctx = context(&[("Dockerfile", "FROM busybox\nCOPY sparse /sparse\n")]);
    std::fs::File::create(ctx.path().join("sparse")).unwrap().set_len(2 << 30).unwrap();
    let out = build(&h, ctx.path(), &["-t", "sparse:1", "--build-disk", "64"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("COPY sparse /sparse") && e.contains("line 2") && e.contains("larger than the build's disk (64 MB"),
        "{e}"
    );
    assert_eq!(layer_blobs(&h), before, "no layer of the refused step");
    assert_eq!(store_scratch(&h).0, tmp_before, "nothing spooled");

    // Positive control: a build within its disk makes layers; `image rm` then `image gc`
    // leaves no blob of it (its cached steps are forgotten with the image).
    let ctx = context(&[("Dockerfile", "FROM busybox\nCOPY small /small\nRUN echo made > /made\n"), ("small", "x")]);
    ok(&build(&h, ctx.path(), &["-t", "small:1", "--build-disk", "64"]));
    assert!(layer_blobs(&h).len() > before.len(), "the build stored layers");
    assert_eq!(ok(&h.run(&["--image", "small:1", "--", "cat", "/small", "/made"])), "xmade\n");
    ok(&h.ml(&["image", "rm", "small:1"]));
    ok(&h.ml(&["image", "gc"]));
    assert_eq!(layer_blobs(&h), before, "image gc reclaimed every blob of the build");

    // The cache alone, after a build whose image is kept: `build --prune` forgets it.
    ok(&build(&h, ctx.path(), &["-t", "small:2", "--build-disk", "64"]));
    let again = build(&h, ctx.path(), &["-t", "small:2", "--build-disk", "64"]);
    assert_eq!(cached_steps(&again), 2, "{}", stderr(&again));
    let pruned = ok(&h.ml(&["build", "--prune"]));
    assert!(pruned.starts_with("Forgot 2 cached build steps"), "{pruned}");
    let rebuilt = build(&h, ctx.path(), &["-t", "small:2", "--build-disk", "64"]);
    // The RUN runs again; the COPY's layer is still the kept image's, so it is stored.
    let e = stderr(&rebuilt);
    assert!(e.contains("[3/3] RUN echo made") && !e.contains("CACHED [3/3]"), "the cache was forgotten: {e}");
    ok(&h.ml(&["image", "rm", "small:2"]));
    ok(&h.ml(&["image", "gc"]));
    assert_eq!(layer_blobs(&h), before);
}
