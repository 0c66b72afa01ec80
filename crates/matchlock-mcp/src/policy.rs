//! The operator's policy, fixed when the server starts: what every sandbox boots with and
//! how much a client may use. Tool arguments only choose among what it allows.

use std::time::Duration;

use matchlock_api::SandboxConfig;

/// Why a tool call was refused by the policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The image is neither `--image` nor in `--allow-image`.
    #[error("image {asked} is not allowed: the operator allows {allowed}")]
    ImageNotAllowed {
        /// What the call asked for.
        asked: String,
        /// The allowed images, comma-separated.
        allowed: String,
    },
    /// `--max-sandboxes` are open.
    #[error("too many sandboxes: {max} are open (the operator's --max-sandboxes); close one with sandbox_close")]
    TooManySandboxes {
        /// The limit.
        max: usize,
    },
}

/// What the operator fixed at start.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Every sandbox's configuration (network, secrets, volumes, resources); its image is
    /// the default one.
    pub base: SandboxConfig,
    /// Further images a call may name (`--allow-image`).
    pub other_images: Vec<String>,
    /// Most sandboxes open at once, one-shot ones included.
    pub max_sandboxes: usize,
    /// A sandbox no call used for this long is closed.
    pub idle_timeout: Duration,
    /// Longest a command may run; a call may ask for less, never more.
    pub call_timeout: Duration,
    /// Most bytes of each of stdout and stderr a result carries.
    pub max_output: usize,
}

impl Policy {
    /// The configuration of a new sandbox of `image` (the default image when `None`).
    pub fn config_for(&self, image: Option<&str>) -> Result<SandboxConfig, PolicyError> {
        let mut config = self.base.clone();
        match image.map(str::trim).filter(|i| !i.is_empty()) {
            None => {}
            Some(asked) if asked == self.base.image => {}
            Some(asked) if self.other_images.iter().any(|i| i == asked) => config.image = asked.to_owned(),
            Some(asked) => {
                return Err(PolicyError::ImageNotAllowed { asked: asked.to_owned(), allowed: self.images().join(", ") })
            }
        }
        Ok(config)
    }

    /// Every image a call may name, the default first.
    pub fn images(&self) -> Vec<String> {
        std::iter::once(&self.base.image).chain(&self.other_images).cloned().collect()
    }

    /// How long a command may run when the call asked for `asked` seconds.
    pub fn time_limit(&self, asked: Option<u64>) -> Duration {
        match asked {
            Some(seconds) if seconds > 0 => Duration::from_secs(seconds).min(self.call_timeout),
            _ => self.call_timeout,
        }
    }

    /// The policy in words, for the model: what the sandboxes can reach and use.
    pub fn describe(&self) -> String {
        let mut text =
            format!("Each sandbox is a virtual machine booted from an OCI image (default {}", self.base.image);
        if !self.other_images.is_empty() {
            text.push_str(&format!("; also allowed: {}", self.other_images.join(", ")));
        }
        text.push_str(&format!("), {} CPU(s), {} MB of memory. ", self.base.cpus, self.base.memory_mb));
        match &self.base.network {
            None => text.push_str("It has no network. "),
            Some(network) if network.allowed_hosts.is_empty() && network.secrets.is_empty() => {
                text.push_str("It can reach the internet (private and host addresses excepted). ");
            }
            Some(network) => {
                if network.allowed_hosts.is_empty() {
                    text.push_str("HTTP(S) goes through the host's proxy. ");
                } else {
                    text.push_str(&format!(
                        "It can reach only these hosts over HTTP(S): {}. ",
                        network.allowed_hosts.join(", ")
                    ));
                }
                for secret in &network.secrets {
                    let hosts =
                        if secret.hosts.is_empty() { "any allowed host".to_owned() } else { secret.hosts.join(", ") };
                    text.push_str(&format!(
                        "${} holds a placeholder that the host replaces with the real secret on requests to {hosts}. ",
                        secret.name
                    ));
                }
            }
        }
        if let Some(workspace) = &self.base.workspace {
            text.push_str(&format!("The operator's files are under {workspace}. "));
        }
        text.push_str(&format!(
            "At most {} sandboxes may be open; one unused for {} s is closed; a command runs at most {} s; \
             each of stdout and stderr is cut after {} bytes.",
            self.max_sandboxes,
            self.idle_timeout.as_secs(),
            self.call_timeout.as_secs(),
            self.max_output
        ));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            base: SandboxConfig::new("python:3.12-slim".to_owned()),
            other_images: vec!["node:22".into()],
            max_sandboxes: 2,
            idle_timeout: Duration::from_secs(60),
            call_timeout: Duration::from_secs(30),
            max_output: 1000,
        }
    }

    #[test]
    fn only_the_operators_images_are_chosen() {
        let p = policy();
        assert_eq!(p.config_for(None).unwrap().image, "python:3.12-slim");
        assert_eq!(p.config_for(Some(" ")).unwrap().image, "python:3.12-slim");
        assert_eq!(p.config_for(Some("node:22")).unwrap().image, "node:22");
        let refused = p.config_for(Some("alpine")).unwrap_err();
        assert_eq!(refused.to_string(), "image alpine is not allowed: the operator allows python:3.12-slim, node:22");
    }

    #[test]
    fn a_call_may_shorten_the_time_limit_but_never_extend_it() {
        let p = policy();
        assert_eq!(p.time_limit(None), Duration::from_secs(30));
        assert_eq!(p.time_limit(Some(0)), Duration::from_secs(30));
        assert_eq!(p.time_limit(Some(5)), Duration::from_secs(5));
        assert_eq!(p.time_limit(Some(3600)), Duration::from_secs(30));
    }

    #[test]
    fn the_description_names_hosts_and_secrets_but_never_a_value() {
        let mut p = policy();
        let network = p.base.network.as_mut().unwrap();
        network.allowed_hosts = vec!["pypi.org".into()];
        network.secrets.push(matchlock_api::config::Secret {
            name: "API_KEY".into(),
            value: "sk-very-secret".into(),
            placeholder: "SANDBOX_SECRET_00".into(),
            hosts: vec!["api.example.com".into()],
        });
        let text = p.describe();
        assert!(text.contains("pypi.org") && text.contains("$API_KEY") && text.contains("api.example.com"), "{text}");
        assert!(!text.contains("sk-very-secret"), "{text}");
    }
}
