//! The parts of an OCI image config that decide how a command runs.

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
    fn null_config_is_default() {
        let raw: RawImageConfig =
            serde_json::from_str(r#"{"config":null,"rootfs":{"type":"layers","diff_ids":[]}}"#).unwrap();
        assert_eq!(raw.image_config(), ImageConfig::default());
    }
}
