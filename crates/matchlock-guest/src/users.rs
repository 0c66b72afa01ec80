//! Resolving `-u` specs (`name`, `uid`, `uid:gid`, `name:group`) against /etc/passwd and
//! /etc/group, the way Docker does.

/// The identity a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (including the primary one).
    pub groups: Vec<u32>,
    /// Home directory (`/` when the user has no passwd entry).
    pub home: String,
}

/// Errors resolving a user spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum UserError {
    /// The user name is not in /etc/passwd.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    UnknownUser(String),
    /// The group name is not in /etc/group.
    #[error("unable to find group {0}: no matching entries in group file")]
    UnknownGroup(String),
    /// The spec is empty or malformed.
    #[error("invalid user spec {0:?}")]
    Invalid(String),
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(PasswdEntry { name: f[0], uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5] })
    })
}

/// (name, gid, members) of each well-formed /etc/group line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `spec` with the contents of /etc/passwd and /etc/group (either may be empty).
pub(crate) fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(UserError::Invalid(spec.to_owned()));
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?,
        ),
    };
    let uid = entry.as_ref().map_or_else(|| user_part.parse().unwrap_or(0), |e| e.uid);
    let mut gid = entry.as_ref().map_or(0, |e| e.gid);
    let home = entry.as_ref().map_or("/", |e| e.home).to_owned();
    let home = if home.is_empty() { "/".to_owned() } else { home };
    let mut groups = Vec::new();
    match group_part {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group)
                    .find(|(name, _, _)| *name == g)
                    .map(|(_, gid, _)| gid)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
            };
        }
        None => {
            if let Some(e) = &entry {
                groups.extend(
                    group_entries(group).filter(|(_, _, members)| members.contains(&e.name)).map(|(_, gid, _)| gid),
                );
            }
        }
    }
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Identity { uid, gid, groups, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        app:x:1000:1000::/home/app:/bin/sh\nbroken line\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,root\nnogroup:x:65534:\napp:x:1000:\n";

    #[test]
    fn by_name_uid_and_pair() {
        let nobody = resolve("nobody", PASSWD, GROUP).unwrap();
        assert_eq!((nobody.uid, nobody.gid, nobody.home.as_str()), (65534, 65534, "/nonexistent"));
        assert_eq!(resolve("65534", PASSWD, GROUP).unwrap(), nobody);
        let pair = resolve("65534:65534", PASSWD, GROUP).unwrap();
        assert_eq!((pair.uid, pair.gid), (65534, 65534));
        let app = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!(app.groups, vec![1000, 10]);
        assert_eq!(resolve("app:nogroup", PASSWD, GROUP).unwrap().gid, 65534);
    }

    #[test]
    fn unknown_numeric_uid_is_allowed_like_docker() {
        let id = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (4242, 0, "/"));
    }

    #[test]
    fn errors() {
        assert_eq!(resolve("ghost", PASSWD, GROUP), Err(UserError::UnknownUser("ghost".into())));
        assert_eq!(resolve("root:ghosts", PASSWD, GROUP), Err(UserError::UnknownGroup("ghosts".into())));
        assert!(matches!(resolve("", PASSWD, GROUP), Err(UserError::Invalid(_))));
        assert!(matches!(resolve("root:", PASSWD, GROUP), Err(UserError::Invalid(_))));
    }
}
