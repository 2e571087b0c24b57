//! What a caller may ask for, and the checks that run before anything is recorded.
//!
//! Every check names the field it rejects, so a control plane can show the operator what
//! to fix. Validation is pure: it never touches the host or the store.

use serde::{Deserialize, Serialize};

/// The machine a caller asked for, after validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// Image reference (see `image::ImageRef::parse`).
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The workload; empty means the image's default.
    pub command: Vec<String>,
    /// Environment of the workload, sorted by name.
    pub env: Vec<(String, String)>,
    /// TCP ports the workload serves.
    pub ports: Vec<u16>,
    /// Replaces the image's entrypoint; set, the image's default command is dropped too
    /// (what container runtimes do).
    pub entrypoint: Vec<String>,
    /// Replaces the image's working directory.
    pub workdir: Option<String>,
    /// Replaces the image's user (`user[:group]`, names or numeric ids).
    pub user: Option<String>,
    /// The root disk's size in MiB when larger than the base image's (grown with
    /// resize2fs); 0 or smaller: the base's size.
    pub disk_mib: u32,
}

/// Per-machine limits from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest vCPU count.
    pub max_vcpus: u32,
    /// Smallest memory in MiB.
    pub min_memory_mib: u64,
    /// Largest memory in MiB.
    pub max_memory_mib: u64,
}

/// A rejected field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A required field is empty.
    #[error("{field}: is required")]
    Missing {
        /// The field, as named in the API.
        field: &'static str,
    },
    /// A field has a value that cannot be accepted.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as named in the API.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl SpecError {
    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            SpecError::Missing { field } | SpecError::Invalid { field, .. } => field,
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A request id is the caller's idempotency key: `[A-Za-z0-9._-]{1,64}`, never `.` or `..`.
pub fn check_request_id(id: &str) -> Result<(), SpecError> {
    const FIELD: &str = "request_id";
    if id.is_empty() {
        return Err(SpecError::Missing { field: FIELD });
    }
    if id.len() > 64 {
        return Err(invalid(FIELD, "longer than 64 characters"));
    }
    if id == "." || id.contains("..") {
        return Err(invalid(FIELD, "must not contain `..`"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(FIELD, format!("character {c:?} is not allowed")));
    }
    Ok(())
}

/// A name is a DNS label: `[a-z0-9-]{1,63}`, not starting or ending with `-`.
pub fn check_name(name: &str) -> Result<(), SpecError> {
    const FIELD: &str = "name";
    if name.is_empty() {
        return Err(SpecError::Missing { field: FIELD });
    }
    if name.len() > 63 {
        return Err(invalid(FIELD, "longer than 63 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(invalid(
            FIELD,
            format!("character {c:?} is not allowed (a DNS label: a-z, 0-9, -)"),
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid(FIELD, "must not start or end with `-`"));
    }
    Ok(())
}

/// Machine ids are made by hearth: 10 lowercase hex characters. Anything else a caller
/// sends (a path, `..`, a name) is rejected before any lookup.
pub fn check_machine_id(id: &str) -> Result<(), SpecError> {
    const FIELD: &str = "id";
    if id.is_empty() {
        return Err(SpecError::Missing { field: FIELD });
    }
    let ok = id.len() == MACHINE_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !ok {
        return Err(invalid(
            FIELD,
            format!("{id:?} is not a machine id ({MACHINE_ID_LEN} lowercase hex characters)"),
        ));
    }
    Ok(())
}

/// Length of a machine id. Short enough that `<prefix><id>` fits a Linux interface name.
pub const MACHINE_ID_LEN: usize = 10;

/// A fresh random machine id.
pub fn new_machine_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; MACHINE_ID_LEN / 2];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The raw fields of a create request, as the API received them.
#[derive(Debug, Clone, Default)]
pub struct RawSpec {
    /// `spec.image`.
    pub image: String,
    /// `spec.vcpus`.
    pub vcpus: u32,
    /// `spec.memory_mib`.
    pub memory_mib: u32,
    /// `spec.command`.
    pub command: Vec<String>,
    /// `spec.env`.
    pub env: Vec<(String, String)>,
    /// `spec.ports`.
    pub ports: Vec<u32>,
    /// `spec.entrypoint`.
    pub entrypoint: Vec<String>,
    /// `spec.workdir`; empty: the image's.
    pub workdir: String,
    /// `spec.user`; empty: the image's.
    pub user: String,
    /// `spec.disk_mib`.
    pub disk_mib: u32,
}

/// Largest root disk a spec may ask for, in MiB (1 TiB).
pub const MAX_DISK_MIB: u32 = 1 << 20;

/// Checks a spec's shape against the limits. Whether the image exists is checked by the
/// caller (it touches the file system).
pub fn check_spec(raw: RawSpec, limits: &Limits) -> Result<MachineSpec, SpecError> {
    if raw.image.is_empty() {
        return Err(SpecError::Missing {
            field: "spec.image",
        });
    }
    if raw.vcpus == 0 {
        return Err(invalid("spec.vcpus", "must be at least 1"));
    }
    if raw.vcpus > limits.max_vcpus {
        return Err(invalid(
            "spec.vcpus",
            format!(
                "{} exceeds the per-machine limit {}",
                raw.vcpus, limits.max_vcpus
            ),
        ));
    }
    let memory = u64::from(raw.memory_mib);
    if memory < limits.min_memory_mib || memory > limits.max_memory_mib {
        return Err(invalid(
            "spec.memory_mib",
            format!(
                "{memory} is outside {}..={} MiB",
                limits.min_memory_mib, limits.max_memory_mib
            ),
        ));
    }
    if raw.command.iter().any(|arg| arg.contains('\0')) {
        return Err(invalid("spec.command", "an argument contains a NUL byte"));
    }
    if raw
        .command
        .first()
        .is_some_and(|program| program.is_empty())
    {
        return Err(invalid(
            "spec.command",
            "the program (first element) is empty",
        ));
    }
    let mut env = raw.env;
    env.sort();
    for (key, value) in &env {
        let key_ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(invalid(
                "spec.env",
                format!("{key:?} is not a variable name"),
            ));
        }
        if value.contains('\0') {
            return Err(invalid(
                "spec.env",
                format!("the value of {key} contains a NUL byte"),
            ));
        }
    }
    let mut ports = Vec::with_capacity(raw.ports.len());
    for port in raw.ports {
        match u16::try_from(port) {
            Ok(p) if p != 0 => ports.push(p),
            _ => return Err(invalid("spec.ports", format!("{port} is not a TCP port"))),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    if raw.entrypoint.iter().any(|arg| arg.contains('\0')) {
        return Err(invalid(
            "spec.entrypoint",
            "an argument contains a NUL byte",
        ));
    }
    if raw.entrypoint.first().is_some_and(|p| p.is_empty()) {
        return Err(invalid(
            "spec.entrypoint",
            "the program (first element) is empty",
        ));
    }
    let workdir = (!raw.workdir.is_empty()).then_some(raw.workdir);
    if let Some(w) = &workdir
        && (!w.starts_with('/') || w.contains('\0'))
    {
        return Err(invalid(
            "spec.workdir",
            format!("{w:?} is not an absolute path"),
        ));
    }
    let user = (!raw.user.is_empty()).then_some(raw.user);
    if let Some(u) = &user {
        let parts: Vec<&str> = u.split(':').collect();
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        };
        if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
            return Err(invalid(
                "spec.user",
                format!("{u:?} is not user[:group] (names or numeric ids)"),
            ));
        }
    }
    if raw.disk_mib > MAX_DISK_MIB {
        return Err(invalid(
            "spec.disk_mib",
            format!("{} exceeds {MAX_DISK_MIB} MiB", raw.disk_mib),
        ));
    }
    Ok(MachineSpec {
        image: raw.image,
        vcpus: raw.vcpus,
        memory_mib: raw.memory_mib,
        command: raw.command,
        env,
        ports,
        entrypoint: raw.entrypoint,
        workdir,
        user,
        disk_mib: raw.disk_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_overrides_are_checked_naming_the_field() {
        let cases: Vec<(RawSpec, &str)> = vec![
            (
                RawSpec {
                    entrypoint: vec!["".into()],
                    ..raw()
                },
                "spec.entrypoint",
            ),
            (
                RawSpec {
                    workdir: "relative/dir".into(),
                    ..raw()
                },
                "spec.workdir",
            ),
            (
                RawSpec {
                    user: "a:b:c".into(),
                    ..raw()
                },
                "spec.user",
            ),
            (
                RawSpec {
                    user: "bad user".into(),
                    ..raw()
                },
                "spec.user",
            ),
            (
                RawSpec {
                    disk_mib: MAX_DISK_MIB + 1,
                    ..raw()
                },
                "spec.disk_mib",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(check_spec(spec, &LIMITS).unwrap_err().field(), field);
        }
        let ok = check_spec(
            RawSpec {
                entrypoint: vec!["/bin/app".into(), "--serve".into()],
                workdir: "/srv".into(),
                user: "app:staff".into(),
                disk_mib: 2048,
                ..raw()
            },
            &LIMITS,
        )
        .unwrap();
        assert_eq!(ok.workdir.as_deref(), Some("/srv"));
        assert_eq!(ok.user.as_deref(), Some("app:staff"));
        assert_eq!(ok.disk_mib, 2048);
        let defaults = check_spec(raw(), &LIMITS).unwrap();
        assert_eq!((defaults.workdir, defaults.user), (None, None));
    }

    const LIMITS: Limits = Limits {
        max_vcpus: 8,
        min_memory_mib: 96,
        max_memory_mib: 4096,
    };

    fn raw() -> RawSpec {
        RawSpec {
            image: "demo".into(),
            vcpus: 1,
            memory_mib: 128,
            ..RawSpec::default()
        }
    }

    #[test]
    fn request_ids() {
        assert!(check_request_id("req-1.a_B").is_ok());
        for (bad, why) in [
            ("", "required"),
            ("a/b", "'/'"),
            ("..", ".."),
            ("a..b", ".."),
        ] {
            let err = check_request_id(bad).unwrap_err();
            assert_eq!(err.field(), "request_id");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        assert!(check_request_id(&"x".repeat(65)).is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("web-1").is_ok());
        for bad in ["", "Web", "a_b", "-a", "a-", "a/b", "..", &"a".repeat(64)] {
            assert_eq!(check_name(bad).unwrap_err().field(), "name", "{bad}");
        }
    }

    #[test]
    fn machine_ids() {
        let id = new_machine_id().expect("random");
        assert!(check_machine_id(&id).is_ok());
        for bad in [
            "",
            "../etc",
            "0123456789a",
            "ABCDEF0123",
            "01234/6789",
            "..........",
        ] {
            assert_eq!(check_machine_id(bad).unwrap_err().field(), "id", "{bad}");
        }
    }

    #[test]
    fn spec_fields_are_named() {
        let cases: Vec<(RawSpec, &str)> = vec![
            (
                RawSpec {
                    image: String::new(),
                    ..raw()
                },
                "spec.image",
            ),
            (RawSpec { vcpus: 0, ..raw() }, "spec.vcpus"),
            (
                RawSpec {
                    vcpus: 1000,
                    ..raw()
                },
                "spec.vcpus",
            ),
            (
                RawSpec {
                    memory_mib: 0,
                    ..raw()
                },
                "spec.memory_mib",
            ),
            (
                RawSpec {
                    memory_mib: u32::MAX,
                    ..raw()
                },
                "spec.memory_mib",
            ),
            (
                RawSpec {
                    ports: vec![70000],
                    ..raw()
                },
                "spec.ports",
            ),
            (
                RawSpec {
                    ports: vec![0],
                    ..raw()
                },
                "spec.ports",
            ),
            (
                RawSpec {
                    env: vec![("A B".into(), "x".into())],
                    ..raw()
                },
                "spec.env",
            ),
            (
                RawSpec {
                    command: vec![String::new()],
                    ..raw()
                },
                "spec.command",
            ),
        ];
        for (spec, field) in cases {
            let err = check_spec(spec, &LIMITS).unwrap_err();
            assert_eq!(err.field(), field, "{err}");
        }
    }

    #[test]
    fn good_spec_is_normalised() {
        let spec = check_spec(
            RawSpec {
                ports: vec![8080, 80, 80],
                env: vec![("B".into(), "2".into()), ("A".into(), "1".into())],
                ..raw()
            },
            &LIMITS,
        )
        .expect("valid");
        assert_eq!(spec.ports, vec![80, 8080]);
        assert_eq!(spec.env[0].0, "A");
    }
}
