//! The image config blob, reduced to what starts the workload in the guest: entrypoint,
//! command, environment, working directory and user (handed on to `hearth-init`).
//!
//! Both OCI and Docker configs use the same JSON field names; absent, `null` and empty
//! values all mean "not set", as container runtimes treat them.

use serde::Deserialize;

/// The runtime settings an image asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`: the program and its leading arguments.
    pub entrypoint: Vec<String>,
    /// `Cmd`: arguments after the entrypoint, or the program when there is none.
    pub cmd: Vec<String>,
    /// `Env`, split at the first `=`, in the image's order.
    pub env: Vec<(String, String)>,
    /// `WorkingDir`, when set.
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`, ...), when set.
    pub user: Option<String>,
    /// `rootfs.diff_ids`: digests of the uncompressed layers, bottom first, so the
    /// unpacker can verify what it applies.
    pub diff_ids: Vec<String>,
    /// `architecture` as the image declares it (e.g. `amd64`), when present.
    pub architecture: Option<String>,
    /// `os` as the image declares it (e.g. `linux`), when present.
    pub os: Option<String>,
}

/// Why a config blob could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The blob is not JSON of the expected shape.
    #[error("config is not valid image config JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An `Env` entry without `=`.
    #[error("config Env entry `{0}` has no `=`")]
    EnvEntry(String),
}

#[derive(Deserialize)]
struct RawImage {
    architecture: Option<String>,
    os: Option<String>,
    config: Option<RawConfig>,
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    diff_ids: Option<Vec<String>>,
}

impl ImageConfig {
    /// Reads a config blob (`application/vnd.oci.image.config.v1+json` or Docker's).
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig, ConfigError> {
        let raw: RawImage = serde_json::from_slice(bytes)?;
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let mut out = ImageConfig {
            diff_ids: raw.rootfs.and_then(|r| r.diff_ids).unwrap_or_default(),
            architecture: non_empty(raw.architecture),
            os: non_empty(raw.os),
            ..ImageConfig::default()
        };
        if let Some(config) = raw.config {
            out.entrypoint = config.entrypoint.unwrap_or_default();
            out.cmd = config.cmd.unwrap_or_default();
            out.working_dir = non_empty(config.working_dir);
            out.user = non_empty(config.user);
            for entry in config.env.unwrap_or_default() {
                let (key, value) = entry
                    .split_once('=')
                    .ok_or_else(|| ConfigError::EnvEntry(entry.clone()))?;
                out.env.push((key.to_string(), value.to_string()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_through_and_empty_means_unset() {
        let json = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {
                "Entrypoint": ["/bin/app", "--serve"], "Cmd": ["--port", "80"],
                "Env": ["PATH=/usr/bin:/bin", "EMPTY=", "EQ=a=b"],
                "WorkingDir": "/srv", "User": "1000:1000", "Labels": {"x": "y"}
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]},
            "history": []
        }"#;
        let c = ImageConfig::parse(json).unwrap();
        assert_eq!(c.entrypoint, ["/bin/app", "--serve"]);
        assert_eq!(c.cmd, ["--port", "80"]);
        assert_eq!(
            c.env,
            [
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("EMPTY".to_string(), String::new()),
                ("EQ".to_string(), "a=b".to_string()),
            ]
        );
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.diff_ids, ["sha256:aa"]);
        assert_eq!(c.architecture.as_deref(), Some("amd64"));

        let c = ImageConfig::parse(
            br#"{"config": {"Entrypoint": null, "Cmd": null, "WorkingDir": "", "User": ""}}"#,
        )
        .unwrap();
        assert_eq!(c, ImageConfig::default());
        assert_eq!(ImageConfig::parse(b"{}").unwrap(), ImageConfig::default());
    }

    #[test]
    fn malformed_configs_are_refused_with_the_reason() {
        let e = ImageConfig::parse(br#"{"config": {"Env": ["NOEQUALS"]}}"#).unwrap_err();
        assert!(e.to_string().contains("NOEQUALS"), "{e}");
        let e = ImageConfig::parse(br#"{"config": {"Cmd": "sh"}}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Json(_)), "{e}");
        assert!(ImageConfig::parse(b"not json").is_err());
    }
}
