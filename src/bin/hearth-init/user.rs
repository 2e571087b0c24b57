//! Who the workload runs as: the image config's `User` resolved against the root disk's
//! `/etc/passwd` and `/etc/group`, the way container runtimes do.
//!
//! Forms: `user`, `uid`, `user:group`, `uid:gid`, `user:gid`, `uid:group`. A name must be
//! found; a number need not be (`1000` with no passwd entry runs as uid 1000, gid 0).
//! Without an explicit group the user's primary group from passwd applies, and the
//! supplementary groups are those of /etc/group that list the user by name.

/// The resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
    /// The home directory from passwd, for `HOME` when the workload's env has none.
    pub home: Option<String>,
}

/// Why a `User` could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// The value is empty or malformed.
    #[error("user {0:?}: expected user[:group] (names or numeric ids)")]
    Malformed(String),
    /// A user name is not in /etc/passwd.
    #[error("user {0:?}: no such user in /etc/passwd")]
    NoUser(String),
    /// A group name is not in /etc/group.
    #[error("group {0:?}: no such group in /etc/group")]
    NoGroup(String),
}

/// One `/etc/passwd` line: name, uid, gid, home.
fn passwd_entries(passwd: &str) -> impl Iterator<Item = (&str, u32, u32, &str)> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some((f[0], f[2].parse().ok()?, f[3].parse().ok()?, f[5]))
    })
}

/// One `/etc/group` line: name, gid, members.
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

/// Resolves `spec` against the contents of /etc/passwd and /etc/group (either may be
/// empty when the image has none).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(UserError::Malformed(spec.to_string()));
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.1 == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.0 == user_part)
                .ok_or_else(|| UserError::NoUser(user_part.to_string()))?,
        ),
    };
    let uid = match entry {
        Some(e) => e.1,
        None => user_part
            .parse()
            .map_err(|_| UserError::Malformed(spec.to_string()))?,
    };
    let home = entry.map(|e| e.3.to_string()).filter(|h| !h.is_empty());
    let (gid, groups) = match group_part {
        Some(g) => {
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group)
                    .find(|e| e.0 == g)
                    .map(|e| e.1)
                    .ok_or_else(|| UserError::NoGroup(g.to_string()))?,
            };
            (gid, Vec::new())
        }
        None => {
            let gid = entry.map(|e| e.2).unwrap_or(0);
            let name = entry.map(|e| e.0);
            let mut extra: Vec<u32> = group_entries(group)
                .filter(|e| name.is_some_and(|n| e.2.contains(&n)) && e.1 != gid)
                .map(|e| e.1)
                .collect();
            extra.sort_unstable();
            extra.dedup();
            (gid, extra)
        }
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        www:x:33:33:www:/var/www:/bin/false\n\
        app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:\napp:x:1000:\nstaff:x:50:app,www\nvideo:x:44:app\n";

    #[test]
    fn names_and_numbers_resolve_like_a_container_runtime() {
        let app = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.groups, vec![44, 50]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        let www = resolve("33", PASSWD, GROUP).unwrap();
        assert_eq!((www.uid, www.gid), (33, 33));
        let raw = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!((raw.uid, raw.gid, raw.home), (4242, 0, None));
        let explicit = resolve("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((explicit.uid, explicit.gid), (1000, 50));
        assert!(explicit.groups.is_empty());
        let numeric = resolve("1000:7", "", "").unwrap();
        assert_eq!((numeric.uid, numeric.gid), (1000, 7));
    }

    #[test]
    fn unknown_names_and_malformed_values_are_errors_naming_them() {
        assert_eq!(
            resolve("nobody", PASSWD, GROUP),
            Err(UserError::NoUser("nobody".into()))
        );
        assert_eq!(
            resolve("app:wheel", PASSWD, GROUP),
            Err(UserError::NoGroup("wheel".into()))
        );
        for bad in ["", ":", "app:", ":50"] {
            assert!(
                matches!(resolve(bad, PASSWD, GROUP), Err(UserError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
