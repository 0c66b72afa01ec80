//! The parts of an OCI image config that decide how a command runs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How the image wants its command run (OCI `config` section).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `USER`, empty for root.
    #[serde(default)]
    pub user: String,
    /// `WORKDIR`, empty for `/`.
    #[serde(default)]
    pub working_dir: String,
    /// `ENTRYPOINT`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `CMD`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `ENV`, split on the first `=`.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// `LABEL`s.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `EXPOSE`d ports (`80/tcp`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub exposed_ports: BTreeSet<String>,
    /// `VOLUME`s.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub volumes: BTreeSet<String>,
    /// `STOPSIGNAL`, empty for the default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    /// `HEALTHCHECK` (recorded only: matchlock does not run it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
}

/// An image's `HEALTHCHECK`, as the OCI/Docker config file holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["CMD", …]`, `["CMD-SHELL", "…"]` or `["NONE"]`.
    pub test: Vec<String>,
    /// Nanoseconds between checks (0: the default).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: u64,
    /// Nanoseconds a check may take (0: the default).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: u64,
    /// Nanoseconds of start-up grace (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: u64,
    /// Failures before unhealthy (0: the default).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `{"a": {}, "b": {}}`: how the config file writes a set.
fn object_set(set: &BTreeSet<String>) -> serde_json::Value {
    set.iter().map(|k| (k.clone(), serde_json::json!({}))).collect::<serde_json::Map<_, _>>().into()
}

impl ImageConfig {
    /// The OCI image config file (linux/amd64) of an image with these settings and the
    /// layers `diff_ids` (bottom first): what `image export` and push write, and what an
    /// image's digest is computed over when matchlock made it.
    pub fn to_oci_json(&self, diff_ids: &[String]) -> Vec<u8> {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut runtime = serde_json::Map::new();
        let mut set = |key: &str, value: serde_json::Value, present: bool| {
            if present {
                runtime.insert(key.to_owned(), value);
            }
        };
        set("User", self.user.clone().into(), !self.user.is_empty());
        set("WorkingDir", self.working_dir.clone().into(), !self.working_dir.is_empty());
        set("Entrypoint", self.entrypoint.clone().into(), !self.entrypoint.is_empty());
        set("Cmd", self.cmd.clone().into(), !self.cmd.is_empty());
        set("Env", env.into(), !self.env.is_empty());
        set("Labels", serde_json::json!(self.labels), !self.labels.is_empty());
        set("ExposedPorts", object_set(&self.exposed_ports), !self.exposed_ports.is_empty());
        set("Volumes", object_set(&self.volumes), !self.volumes.is_empty());
        set("StopSignal", self.stop_signal.clone().into(), !self.stop_signal.is_empty());
        set("Healthcheck", serde_json::json!(self.healthcheck), self.healthcheck.is_some());
        let doc = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            // One entry per layer: tools that map history to layers (buildah) need it.
            "history": diff_ids.iter().map(|d| serde_json::json!({"created_by": format!("matchlock layer {d}")})).collect::<Vec<_>>(),
        });
        serde_json::to_vec(&doc).expect("the config serializes")
    }

    /// Applies one `--change` instruction (`CMD`, `ENTRYPOINT`, `ENV`, `WORKDIR`,
    /// `USER`; `CMD`/`ENTRYPOINT` in exec form `["a","b"]` or shell form).
    pub fn apply_change(&mut self, change: &str) -> Result<(), String> {
        let (instruction, rest) = change.trim().split_once(char::is_whitespace).unwrap_or((change.trim(), ""));
        let rest = rest.trim();
        let command = || -> Result<Vec<String>, String> {
            if rest.starts_with('[') {
                serde_json::from_str(rest).map_err(|e| format!("invalid JSON array in {change:?}: {e}"))
            } else if rest.is_empty() {
                Ok(Vec::new())
            } else {
                Ok(vec!["/bin/sh".into(), "-c".into(), rest.to_owned()])
            }
        };
        match instruction.to_ascii_uppercase().as_str() {
            "CMD" => self.cmd = command()?,
            "ENTRYPOINT" => self.entrypoint = command()?,
            "WORKDIR" if rest.starts_with('/') => rest.clone_into(&mut self.working_dir),
            "USER" if !rest.is_empty() => rest.clone_into(&mut self.user),
            "ENV" => {
                let (key, value) = rest
                    .split_once('=')
                    .or_else(|| rest.split_once(char::is_whitespace))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("ENV needs KEY=VALUE: {change:?}"))?;
                let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
                self.env.retain(|(k, _)| *k != key);
                self.env.push((key, value));
            }
            _ => {
                return Err(format!(
                    "unsupported change {change:?} (CMD, ENTRYPOINT, ENV KEY=VALUE, WORKDIR /path or USER name)"
                ))
            }
        }
        Ok(())
    }
}

/// The fields of an OCI/Docker image config file we read.
#[derive(Debug, Deserialize)]
pub struct RawImageConfig {
    /// Runtime configuration.
    #[serde(default)]
    pub config: Option<RawRuntimeConfig>,
    /// Layer diff-ids, bottom first.
    pub rootfs: RawRootfs,
    /// Architecture (`amd64`).
    #[serde(default)]
    pub architecture: String,
}

/// `config` in an image config file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawRuntimeConfig {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    stop_signal: Option<String>,
    #[serde(default)]
    healthcheck: Option<Healthcheck>,
}

/// `rootfs` in an image config file.
#[derive(Debug, Deserialize)]
pub struct RawRootfs {
    /// `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Digests of the uncompressed layer tars.
    pub diff_ids: Vec<String>,
}

impl RawImageConfig {
    /// The runtime settings of this config.
    pub fn image_config(&self) -> ImageConfig {
        let Some(c) = &self.config else { return ImageConfig::default() };
        ImageConfig {
            user: c.user.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            entrypoint: c.entrypoint.clone().unwrap_or_default(),
            cmd: c.cmd.clone().unwrap_or_default(),
            env: c
                .env
                .iter()
                .flatten()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv.clone(), String::new()),
                })
                .collect(),
            labels: c.labels.clone().unwrap_or_default(),
            exposed_ports: c.exposed_ports.iter().flatten().map(|(k, _)| k.clone()).collect(),
            volumes: c.volumes.iter().flatten().map(|(k, _)| k.clone()).collect(),
            stop_signal: c.stop_signal.clone().unwrap_or_default(),
            healthcheck: c.healthcheck.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_config() {
        let raw: RawImageConfig = serde_json::from_str(
            r#"{"architecture":"amd64","config":{"User":"nobody","WorkingDir":"/tmp",
            "Entrypoint":["/bin/echo"],"Cmd":["hi"],"Env":["PATH=/bin","A=b=c","EMPTY"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#,
        )
        .unwrap();
        let c = raw.image_config();
        assert_eq!(c.user, "nobody");
        assert_eq!(c.working_dir, "/tmp");
        assert_eq!(c.entrypoint, vec!["/bin/echo"]);
        assert_eq!(c.env[1], ("A".to_owned(), "b=c".to_owned()));
        assert_eq!(c.env[2], ("EMPTY".to_owned(), String::new()));
        assert_eq!(raw.rootfs.diff_ids, vec!["sha256:00"]);
    }

    #[test]
    fn changes_apply_and_bad_ones_are_refused() {
        let mut c = ImageConfig {
            env: vec![("A".into(), "1".into())],
            labels: [("org.example".to_owned(), "v".to_owned())].into(),
            exposed_ports: ["80/tcp".to_owned()].into(),
            volumes: ["/data".to_owned()].into(),
            stop_signal: "SIGINT".into(),
            healthcheck: Some(Healthcheck {
                test: vec!["CMD".into(), "true".into()],
                retries: 3,
                ..Healthcheck::default()
            }),
            ..ImageConfig::default()
        };
        for change in [
            "CMD [\"python3\", \"-m\", \"http.server\"]",
            "ENTRYPOINT echo hi",
            "ENV A=2",
            "ENV B three",
            "WORKDIR /srv",
            "USER app",
        ] {
            c.apply_change(change).unwrap();
        }
        assert_eq!(c.cmd, ["python3", "-m", "http.server"]);
        assert_eq!(c.entrypoint, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.env, [("A".to_owned(), "2".to_owned()), ("B".to_owned(), "three".to_owned())]);
        assert_eq!((c.working_dir.as_str(), c.user.as_str()), ("/srv", "app"));
        for bad in ["RUN make", "CMD [oops", "WORKDIR relative", "ENV", "USER"] {
            assert!(c.apply_change(bad).is_err(), "{bad}");
        }
        let json: serde_json::Value = serde_json::from_slice(&c.to_oci_json(&["sha256:aa".into()])).unwrap();
        assert_eq!(json["config"]["Env"][1], "B=three");
        assert_eq!(json["rootfs"]["diff_ids"][0], "sha256:aa");
        let raw: RawImageConfig = serde_json::from_value(json).unwrap();
        assert_eq!(raw.image_config(), c, "the config file reads back as the same settings");
    }

    #[test]
    fn null_config_is_default() {
        let raw: RawImageConfig =
            serde_json::from_str(r#"{"config":null,"rootfs":{"type":"layers","diff_ids":[]}}"#).unwrap();
        assert_eq!(raw.image_config(), ImageConfig::default());
    }
}
