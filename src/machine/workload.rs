//! What the guest runs: the image's own workload settings with the spec's overrides
//! applied, the way container runtimes combine them. Pure.
//!
//! - argv = entrypoint ++ command. The spec's entrypoint replaces the image's and then
//!   drops the image's default command; the spec's command replaces the image's command
//!   (it is the arguments when there is an entrypoint, the whole argv when there is none).
//! - env: the image's, then the spec's, a spec entry replacing the image's of that name.
//! - working directory and user: the spec's, else the image's.

use super::record::ImageWorkload;
use super::spec::MachineSpec;

/// The workload as the guest init gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User.
    pub user: Option<String>,
}

/// Why there is nothing to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.command: the image has no entrypoint or command and the spec gives none")]
pub struct NothingToRun;

/// Combines the image's settings with the spec's overrides.
pub fn compose(image: &ImageWorkload, spec: &MachineSpec) -> Result<Workload, NothingToRun> {
    let entrypoint = if spec.entrypoint.is_empty() {
        image.entrypoint.clone()
    } else {
        spec.entrypoint.clone()
    };
    let command = if !spec.command.is_empty() {
        spec.command.clone()
    } else if !spec.entrypoint.is_empty() {
        Vec::new()
    } else {
        image.cmd.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(command).collect();
    if argv.is_empty() {
        return Err(NothingToRun);
    }
    let mut env: Vec<(String, String)> = image
        .env
        .iter()
        .filter(|(k, _)| !spec.env.iter().any(|(key, _)| key == k))
        .cloned()
        .collect();
    env.extend(spec.env.iter().cloned());
    Ok(Workload {
        argv,
        env,
        workdir: spec.workdir.clone().or_else(|| image.working_dir.clone()),
        user: spec.user.clone().or_else(|| image.user.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn image() -> ImageWorkload {
        ImageWorkload {
            entrypoint: strings(&["/app/server"]),
            cmd: strings(&["--port", "80"]),
            env: vec![
                ("PATH".into(), "/bin".into()),
                ("MODE".into(), "prod".into()),
            ],
            working_dir: Some("/app".into()),
            user: Some("app".into()),
        }
    }

    #[test]
    fn the_image_alone_runs_entrypoint_and_command_with_its_settings() {
        let w = compose(&image(), &MachineSpec::default()).unwrap();
        assert_eq!(w.argv, strings(&["/app/server", "--port", "80"]));
        assert_eq!(w.workdir.as_deref(), Some("/app"));
        assert_eq!(w.user.as_deref(), Some("app"));
        assert_eq!(w.env.len(), 2);
    }

    #[test]
    fn spec_overrides_replace_what_runtimes_replace() {
        let spec = MachineSpec {
            command: strings(&["--port", "8080"]),
            env: vec![("MODE".into(), "dev".into()), ("X".into(), "1".into())],
            workdir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            ..MachineSpec::default()
        };
        let w = compose(&image(), &spec).unwrap();
        assert_eq!(w.argv, strings(&["/app/server", "--port", "8080"]));
        assert_eq!(
            w.env,
            vec![
                ("PATH".to_string(), "/bin".to_string()),
                ("MODE".to_string(), "dev".to_string()),
                ("X".to_string(), "1".to_string())
            ]
        );
        assert_eq!(w.workdir.as_deref(), Some("/srv"));
        assert_eq!(w.user.as_deref(), Some("1000:1000"));

        // A new entrypoint drops the image's default command.
        let spec = MachineSpec {
            entrypoint: strings(&["/bin/sh"]),
            ..MachineSpec::default()
        };
        assert_eq!(
            compose(&image(), &spec).unwrap().argv,
            strings(&["/bin/sh"])
        );
        let spec = MachineSpec {
            entrypoint: strings(&["/bin/sh", "-c"]),
            command: strings(&["echo hi"]),
            ..MachineSpec::default()
        };
        assert_eq!(
            compose(&image(), &spec).unwrap().argv,
            strings(&["/bin/sh", "-c", "echo hi"])
        );
    }

    #[test]
    fn an_image_without_entrypoint_takes_the_command_as_the_whole_argv() {
        let bare = ImageWorkload::default();
        assert_eq!(compose(&bare, &MachineSpec::default()), Err(NothingToRun));
        let spec = MachineSpec {
            command: strings(&["/bin/true"]),
            ..MachineSpec::default()
        };
        assert_eq!(compose(&bare, &spec).unwrap().argv, strings(&["/bin/true"]));
    }
}
