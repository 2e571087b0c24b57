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

/// The label under which DNS names machines by id (`<id>.vm.<domain>`, and the same
/// path in etcd's SkyDNS layout): no machine may be called that.
pub const ID_LABEL: &str = "vm";

/// A machine's name: a DNS label (see [`check_name`]) other than [`ID_LABEL`].
pub fn check_machine_name(name: &str) -> Result<(), SpecError> {
    check_name(name)?;
    if name == ID_LABEL {
        return Err(invalid(
            "name",
            format!("{ID_LABEL:?} is reserved: DNS names machines by id under it"),
        ));
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
    if !crate::machine_id::is_machine_id(id) {
        return Err(invalid(
            FIELD,
            format!(
                "{} is not a machine id ({MACHINE_ID_LEN} lowercase hex characters)",
                quoted(id)
            ),
        ));
    }
    Ok(())
}

pub use crate::machine_id::{MACHINE_ID_LEN, new_machine_id};

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

/// Bounds on what a create may carry. Each is far above what a workload needs and far
/// below what would strain the daemon or the guest config (1 MiB of JSON, which the
/// fields together can never reach: see [`check_config_size`]).
pub mod bounds {
    /// Bytes of `spec.image`.
    pub const IMAGE_BYTES: usize = 1024;
    /// Elements of `spec.command` and of `spec.entrypoint`, each.
    pub const ARGS: usize = 256;
    /// Bytes of all of `spec.command`'s elements together, and of `spec.entrypoint`'s.
    pub const ARGS_BYTES: usize = 32 * 1024;
    /// Entries of `spec.env`.
    pub const ENV: usize = 256;
    /// Bytes of all of `spec.env`'s names and values together.
    pub const ENV_BYTES: usize = 32 * 1024;
    /// Bytes of one variable name.
    pub const ENV_NAME_BYTES: usize = 256;
    /// Elements of `spec.ports`.
    pub const PORTS: usize = 64;
    /// Bytes of `spec.workdir` (PATH_MAX).
    pub const WORKDIR_BYTES: usize = 4096;
    /// Bytes of `spec.user`.
    pub const USER_BYTES: usize = 256;
    /// Characters of caller input quoted back in an error.
    pub const QUOTED: usize = 64;
}

/// Caller input as an error quotes it: cut to [`bounds::QUOTED`] and with control
/// characters escaped, so a hostile value can neither bloat an answer nor act on a
/// terminal that prints it.
pub fn quoted(input: &str) -> String {
    format!("{:?}", crate::text::bounded(input, bounds::QUOTED))
}

/// Checks a list of arguments: count, total size, no NUL, a non-empty program.
fn check_args(field: &'static str, args: &[String]) -> Result<(), SpecError> {
    if args.len() > bounds::ARGS {
        return Err(invalid(
            field,
            format!("{} arguments, more than {}", args.len(), bounds::ARGS),
        ));
    }
    let total: usize = args.iter().map(String::len).sum();
    if total > bounds::ARGS_BYTES {
        return Err(invalid(
            field,
            format!(
                "{total} bytes of arguments, more than {}",
                bounds::ARGS_BYTES
            ),
        ));
    }
    if args.iter().any(|arg| arg.contains('\0')) {
        return Err(invalid(field, "an argument contains a NUL byte"));
    }
    if args.first().is_some_and(|program| program.is_empty()) {
        return Err(invalid(field, "the program (first element) is empty"));
    }
    Ok(())
}

/// An image reference's shape before it is parsed: bounded and free of control
/// characters (`field` names it: `spec.image`, or `image` in the image calls).
pub fn check_image_field(field: &'static str, image: &str) -> Result<(), SpecError> {
    if image.is_empty() {
        return Err(SpecError::Missing { field });
    }
    if image.len() > bounds::IMAGE_BYTES {
        return Err(invalid(
            field,
            format!("{} bytes, more than {}", image.len(), bounds::IMAGE_BYTES),
        ));
    }
    if image.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{} contains a control character", quoted(image)),
        ));
    }
    Ok(())
}

/// The part of the guest config a spec fills (its workload), encoded as the guest config
/// encodes it, is refused at admission when it could not fit beside the image's own
/// settings and the network's: half of [`crate::guest::config::MAX_CONFIG_JSON`] is the
/// spec's. The field bounds keep every spec far below it; this is the backstop that
/// names the largest field if they ever change.
pub fn check_config_size(spec: &MachineSpec) -> Result<(), SpecError> {
    let budget = crate::guest::config::MAX_CONFIG_JSON / 2;
    let parts: [(&'static str, usize); 5] = [
        ("spec.command", json_len(&spec.command)),
        ("spec.entrypoint", json_len(&spec.entrypoint)),
        ("spec.env", json_len(&spec.env)),
        ("spec.workdir", json_len(&spec.workdir)),
        ("spec.user", json_len(&spec.user)),
    ];
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    if total > budget {
        let (field, largest) = parts
            .iter()
            .copied()
            .max_by_key(|(_, n)| *n)
            .unwrap_or(("spec", 0));
        return Err(invalid(
            field,
            format!(
                "the workload takes {total} bytes of the guest config ({largest} of them \
                 here), more than {budget}"
            ),
        ));
    }
    Ok(())
}

/// Bytes of a value's JSON encoding (0 when it cannot be encoded: it has no size then).
fn json_len<T: Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

/// Checks a spec's shape against the limits. Whether the image exists is checked by the
/// caller (it touches the file system).
pub fn check_spec(raw: RawSpec, limits: &Limits) -> Result<MachineSpec, SpecError> {
    check_image_field("spec.image", &raw.image)?;
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
    check_args("spec.command", &raw.command)?;
    if raw.env.len() > bounds::ENV {
        return Err(invalid(
            "spec.env",
            format!("{} entries, more than {}", raw.env.len(), bounds::ENV),
        ));
    }
    let env_bytes: usize = raw.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if env_bytes > bounds::ENV_BYTES {
        return Err(invalid(
            "spec.env",
            format!(
                "{env_bytes} bytes of names and values, more than {}",
                bounds::ENV_BYTES
            ),
        ));
    }
    let mut env = raw.env;
    env.sort();
    for (key, value) in &env {
        let key_ok = !key.is_empty()
            && key.len() <= bounds::ENV_NAME_BYTES
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(invalid(
                "spec.env",
                format!("{} is not a variable name", quoted(key)),
            ));
        }
        if value.contains('\0') {
            return Err(invalid(
                "spec.env",
                format!("the value of {key} contains a NUL byte"),
            ));
        }
    }
    if let Some(pair) = env.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(invalid("spec.env", format!("{} is set twice", pair[0].0)));
    }
    if raw.ports.len() > bounds::PORTS {
        return Err(invalid(
            "spec.ports",
            format!("{} ports, more than {}", raw.ports.len(), bounds::PORTS),
        ));
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
    check_args("spec.entrypoint", &raw.entrypoint)?;
    let workdir = (!raw.workdir.is_empty()).then_some(raw.workdir);
    if let Some(w) = &workdir {
        if w.len() > bounds::WORKDIR_BYTES {
            return Err(invalid(
                "spec.workdir",
                format!("{} bytes, more than {}", w.len(), bounds::WORKDIR_BYTES),
            ));
        }
        if !w.starts_with('/') || w.chars().any(char::is_control) {
            return Err(invalid(
                "spec.workdir",
                format!(
                    "{} is not an absolute path without control characters",
                    quoted(w)
                ),
            ));
        }
    }
    let user = (!raw.user.is_empty()).then_some(raw.user);
    if let Some(u) = &user {
        if u.len() > bounds::USER_BYTES {
            return Err(invalid(
                "spec.user",
                format!("{} bytes, more than {}", u.len(), bounds::USER_BYTES),
            ));
        }
        let parts: Vec<&str> = u.split(':').collect();
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        };
        if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
            return Err(invalid(
                "spec.user",
                format!("{} is not user[:group] (names or numeric ids)", quoted(u)),
            ));
        }
    }
    if raw.disk_mib > MAX_DISK_MIB {
        return Err(invalid(
            "spec.disk_mib",
            format!("{} exceeds {MAX_DISK_MIB} MiB", raw.disk_mib),
        ));
    }
    let spec = MachineSpec {
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
    };
    check_config_size(&spec)?;
    Ok(spec)
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
        assert!(check_name(ID_LABEL).is_ok());
        let reserved = check_machine_name(ID_LABEL).unwrap_err();
        assert_eq!(reserved.field(), "name");
        assert!(reserved.to_string().contains("reserved"), "{reserved}");
        assert!(check_machine_name("vm-1").is_ok());
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
    fn every_list_and_string_is_bounded_naming_its_field() {
        let many = |n: usize| (0..n).map(|i| format!("a{i}")).collect::<Vec<_>>();
        let cases: Vec<(RawSpec, &str, &str)> = vec![
            (
                RawSpec {
                    image: "x".repeat(bounds::IMAGE_BYTES + 1),
                    ..raw()
                },
                "spec.image",
                "bytes",
            ),
            (
                RawSpec {
                    image: "demo\x1b[2J".into(),
                    ..raw()
                },
                "spec.image",
                "control",
            ),
            (
                RawSpec {
                    command: many(bounds::ARGS + 1),
                    ..raw()
                },
                "spec.command",
                "arguments",
            ),
            (
                RawSpec {
                    command: vec!["x".repeat(bounds::ARGS_BYTES + 1)],
                    ..raw()
                },
                "spec.command",
                "bytes",
            ),
            (
                RawSpec {
                    entrypoint: many(bounds::ARGS + 1),
                    ..raw()
                },
                "spec.entrypoint",
                "arguments",
            ),
            (
                RawSpec {
                    env: (0..=bounds::ENV)
                        .map(|i| (format!("K{i}"), String::new()))
                        .collect(),
                    ..raw()
                },
                "spec.env",
                "entries",
            ),
            (
                RawSpec {
                    env: vec![("K".into(), "v".repeat(bounds::ENV_BYTES))],
                    ..raw()
                },
                "spec.env",
                "bytes",
            ),
            (
                RawSpec {
                    env: vec![("K".repeat(bounds::ENV_NAME_BYTES + 1), String::new())],
                    ..raw()
                },
                "spec.env",
                "not a variable name",
            ),
            (
                RawSpec {
                    env: vec![("K".into(), "1".into()), ("K".into(), "2".into())],
                    ..raw()
                },
                "spec.env",
                "twice",
            ),
            (
                RawSpec {
                    ports: vec![80; bounds::PORTS + 1],
                    ..raw()
                },
                "spec.ports",
                "ports",
            ),
            (
                RawSpec {
                    workdir: format!("/{}", "d".repeat(bounds::WORKDIR_BYTES)),
                    ..raw()
                },
                "spec.workdir",
                "bytes",
            ),
            (
                RawSpec {
                    workdir: "/srv\nx".into(),
                    ..raw()
                },
                "spec.workdir",
                "control",
            ),
            (
                RawSpec {
                    user: "u".repeat(bounds::USER_BYTES + 1),
                    ..raw()
                },
                "spec.user",
                "bytes",
            ),
        ];
        for (spec, field, why) in cases {
            let err = check_spec(spec, &LIMITS).unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().contains(why), "{err}");
            // An error never quotes more than a bounded, escaped piece of the input.
            assert!(
                err.to_string().len() < 300,
                "{} bytes",
                err.to_string().len()
            );
            assert!(!err.to_string().chars().any(|c| c.is_control()), "{err:?}");
        }
        // At the bounds, a spec is accepted.
        let full = RawSpec {
            command: vec!["c".repeat(bounds::ARGS_BYTES / bounds::ARGS); bounds::ARGS],
            entrypoint: vec!["e".repeat(bounds::ARGS_BYTES / bounds::ARGS); bounds::ARGS],
            env: (0..bounds::ENV)
                .map(|i| {
                    (
                        format!("K{i:03}"),
                        "v".repeat(bounds::ENV_BYTES / bounds::ENV - 4),
                    )
                })
                .collect(),
            ..raw()
        };
        let spec = check_spec(full, &LIMITS).expect("at the bounds");
        check_config_size(&spec).expect("fits the guest config");
    }

    #[test]
    fn a_hostile_id_is_quoted_bounded_and_escaped() {
        let err = check_machine_id(&format!("\x1b]0;x\x07{}", "a".repeat(1 << 20))).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 200, "{} bytes", text.len());
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
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
