//! Composing the command Docker-style from the image config and the user's flags.

use matchlock_api::SandboxConfig;
use matchlock_image::ImageConfig;
use matchlock_protocol::exec::{ExecRequest, WindowSize};

/// Errors composing a command.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComposeError {
    /// Neither the user nor the image gave a command.
    #[error("no command: the image has no ENTRYPOINT or CMD; give one after `--`")]
    NoCommand,
}

/// Where the guest finds the sandbox CA (guest-init also appends it to the system bundle).
pub(crate) const GUEST_CA_PATH: &str = "/etc/ssl/certs/matchlock-ca.crt";

/// Variables that point TLS clients at the sandbox CA under interception.
const CA_ENV: [&str; 4] = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"];

/// The command to run and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composed {
    /// ENTRYPOINT + (args, or CMD when there are none).
    pub argv: Vec<String>,
    /// Image ENV, then the configured env; one entry per key, the last value wins.
    pub env: Vec<(String, String)>,
    /// Configured workdir, else image WORKDIR, else `/`.
    pub working_dir: String,
    /// Configured user, else image USER, else root (`None`).
    pub user: Option<String>,
}

impl Composed {
    /// The exec request for this command, with a terminal of `window` in TTY mode.
    pub fn into_request(self, window: Option<WindowSize>) -> ExecRequest {
        ExecRequest {
            argv: self.argv,
            env: self.env,
            working_dir: Some(self.working_dir),
            user: self.user,
            window,
            rlimits: Vec::new(),
            root: None,
            binds: Vec::new(),
        }
    }
}

/// Merges env lists: later entries override earlier ones, first-seen order is kept.
pub(crate) fn merge_env<'a>(layers: impl IntoIterator<Item = (&'a String, &'a String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in layers {
        match out.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1.clone_from(v),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// Composes the command as `docker run` would.
pub fn compose(image: &ImageConfig, config: &SandboxConfig) -> Result<Composed, ComposeError> {
    let entrypoint = config.entrypoint.clone().unwrap_or_else(|| image.entrypoint.clone());
    let args = if !config.command.is_empty() {
        config.command.clone()
    } else if config.entrypoint.is_some() {
        // Docker: overriding the entrypoint drops the image's CMD.
        Vec::new()
    } else {
        image.cmd.clone()
    };
    compose_command(image, config, entrypoint.into_iter().chain(args).collect())
}

/// `argv` with the environment, working directory and user [`compose`] gives it.
pub fn compose_command(
    image: &ImageConfig,
    config: &SandboxConfig,
    argv: Vec<String>,
) -> Result<Composed, ComposeError> {
    if argv.is_empty() {
        return Err(ComposeError::NoCommand);
    }
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let network = config.network.as_ref();
    let ca_env: Vec<(String, String)> = match network {
        Some(n) if n.intercepts() => CA_ENV.iter().map(|k| ((*k).to_owned(), GUEST_CA_PATH.to_owned())).collect(),
        _ => Vec::new(),
    };
    let secret_env: Vec<(String, String)> =
        network.iter().flat_map(|n| &n.secrets).map(|s| (s.name.clone(), s.placeholder.clone())).collect();
    let env = image.env.iter().map(|(k, v)| (k, v)).chain(ca_env.iter().map(|(k, v)| (k, v)));
    Ok(Composed {
        argv,
        env: merge_env(env.chain(&config.env).chain(secret_env.iter().map(|(k, v)| (k, v)))),
        working_dir: config.workdir.clone().or_else(|| non_empty(&image.working_dir)).unwrap_or_else(|| "/".to_owned()),
        user: config.user.clone().or_else(|| non_empty(&image.user)),
    })
}

/// A command run in a running sandbox (`exec`): as [`compose_command`], in `working_dir`,
/// else the configured or the image's directory, else the workspace, else `/`.
pub fn compose_exec(
    image: &ImageConfig,
    config: &SandboxConfig,
    argv: Vec<String>,
    working_dir: Option<String>,
) -> Result<Composed, ComposeError> {
    let mut composed = compose_command(image, config, argv)?;
    if let Some(dir) = working_dir {
        composed.working_dir = dir;
    } else if config.workdir.is_none() && image.working_dir.is_empty() {
        composed.working_dir = config.workspace.clone().unwrap_or_else(|| "/".into());
    }
    Ok(composed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            user: "nobody".into(),
            working_dir: "/srv".into(),
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            env: vec![("PATH".into(), "/bin".into()), ("A".into(), "image".into())],
            ..ImageConfig::default()
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn entrypoint_and_cmd() {
        let mut c = SandboxConfig::new("x");
        assert_eq!(compose(&image(), &c).unwrap().argv, s(&["/entry", "default"]));
        c.command = s(&["arg"]);
        assert_eq!(compose(&image(), &c).unwrap().argv, s(&["/entry", "arg"]));
        c.entrypoint = Some(s(&["/other"]));
        assert_eq!(compose(&image(), &c).unwrap().argv, s(&["/other", "arg"]));
        c.command.clear();
        assert_eq!(compose(&image(), &c).unwrap().argv, s(&["/other"]));
        c.entrypoint = Some(vec![]);
        assert_eq!(compose(&image(), &c), Err(ComposeError::NoCommand));
    }

    #[test]
    fn env_user_workdir_precedence() {
        let mut c = SandboxConfig::new("x");
        c.env = [("A".into(), "flag".into()), ("B".into(), "b".into())].into();
        let composed = compose(&image(), &c).unwrap();
        assert_eq!(
            composed.env,
            vec![("PATH".into(), "/bin".into()), ("A".into(), "flag".into()), ("B".into(), "b".into())]
        );
        assert_eq!(composed.user.as_deref(), Some("nobody"));
        assert_eq!(composed.working_dir, "/srv");
        c.user = Some("0".into());
        c.workdir = Some("/tmp".into());
        let composed = compose(&ImageConfig::default(), &c);
        assert_eq!(composed, Err(ComposeError::NoCommand));
        c.command = s(&["true"]);
        let composed = compose(&ImageConfig::default(), &c).unwrap();
        assert_eq!((composed.user.as_deref(), composed.working_dir.as_str()), (Some("0"), "/tmp"));
        c.workdir = None;
        c.user = None;
        let composed = compose(&ImageConfig::default(), &c).unwrap();
        assert_eq!((composed.user, composed.working_dir.as_str()), (None, "/"));
    }

    #[test]
    fn secrets_and_ca_under_interception() {
        let mut c = SandboxConfig::new("x");
        c.command = s(&["true"]);
        assert!(!compose(&image(), &c).unwrap().env.iter().any(|(k, _)| k == "SSL_CERT_FILE"));
        let secret = matchlock_api::config::Secret::new("KEY", "real", vec!["api.test".into()]);
        c.env.insert("KEY".into(), "user".into());
        c.network.as_mut().unwrap().secrets.push(secret.clone());
        let env = compose(&image(), &c).unwrap().env;
        assert!(env.contains(&("KEY".into(), secret.placeholder)));
        assert!(env.contains(&("SSL_CERT_FILE".into(), GUEST_CA_PATH.into())));
        assert!(!env.iter().any(|(_, v)| v == "real"));
    }

    #[test]
    fn an_exec_runs_in_the_asked_then_the_configured_then_the_workspace_directory() {
        let argv = || vec!["true".to_owned()];
        let mut c = SandboxConfig::new("x");
        let bare = ImageConfig::default();
        assert_eq!(compose_exec(&bare, &c, argv(), None).unwrap().working_dir, "/");
        c.workspace = Some("/workspace".into());
        assert_eq!(compose_exec(&bare, &c, argv(), None).unwrap().working_dir, "/workspace");
        assert_eq!(compose_exec(&image(), &c, argv(), None).unwrap().working_dir, "/srv", "the image's WORKDIR");
        c.workdir = Some("/w".into());
        assert_eq!(compose_exec(&bare, &c, argv(), None).unwrap().working_dir, "/w");
        assert_eq!(compose_exec(&image(), &c, argv(), Some("/asked".into())).unwrap().working_dir, "/asked");
    }
}
