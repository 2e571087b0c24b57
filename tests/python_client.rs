//! A control plane that is not Rust: Python's `grpcio` (gRPC's C core, as Ruby, C++ and
//! PHP clients use too), with stubs generated from `proto/` at test time, drives a real
//! machine's life through hearthd's Unix socket with the client's default settings:
//! idempotent create, wait, the guest's page over HTTP, ListRoutes, bad input naming the
//! field, destroy (`tests/python/lifecycle.py`); once over the socket, once over the TCP
//! listener with mutual TLS (where a client without a certificate is refused first).
//!
//! The venv comes from `deploy/install-deps.sh` (`HEARTH_PY_VENV`, default
//! `/opt/hearth/python`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::Daemon;

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("HEARTH_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/hearth/python"));
    venv.join("bin/python")
}

/// The venv's python when it has grpcio and grpcio-tools; otherwise reports the skip.
fn python() -> Option<PathBuf> {
    let python = venv_python();
    let ok = Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        support::skipped(
            "python_client",
            &format!(
                "no grpcio and grpcio-tools at {} (run deploy/install-deps.sh)",
                python.display()
            ),
        );
        return None;
    }
    Some(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_drives_a_machine_with_default_settings() {
    if support::guest_prereqs::guest_prereqs("python_client").is_none() {
        return;
    }
    let Some(python) = python() else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = tempfile::tempdir().expect("stubs dir");
    let generated = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo.join("proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg("hearth/v1/hearth.proto")
        .output()
        .expect("run protoc");
    assert!(
        generated.status.success(),
        "stubs: {}",
        String::from_utf8_lossy(&generated.stderr)
    );

    let mut daemon = Daemon::prepare("[vmm]\nkind = \"qemu\"\n");
    let pki = support::tls::Pki::make(&daemon.dir.path().join("pki"));
    daemon.rewrite_config(|text| support::tls::with_api_keys(text, &pki.api_keys()));
    daemon.spawn();
    let mut client = daemon.client().await;
    let address = support::node(&mut client).await.api_address;
    assert!(!address.is_empty(), "the daemon serves TCP");
    let socket = daemon.dir.path().join("api.sock");
    let script = repo.join("tests/python/lifecycle.py");
    let over_socket = vec![
        format!("unix:{}", socket.display()),
        stubs.path().display().to_string(),
        "py-unix".to_string(),
    ];
    let mut over_tls = vec![
        address,
        stubs.path().display().to_string(),
        "py-tls".to_string(),
    ];
    for file in ["ca.pem", "client.pem", "client.key"] {
        over_tls.push(pki.path(file).display().to_string());
    }
    for (name, args) in [
        ("Unix socket", over_socket),
        ("TCP with mutual TLS", over_tls),
    ] {
        let run = tokio::process::Command::new(&python)
            .arg(&script)
            .args(&args)
            .output()
            .await
            .expect("run the python client");
        let stdout = String::from_utf8_lossy(&run.stdout);
        println!("{name}:\n{stdout}");
        assert!(
            run.status.success() && stdout.contains("python-client: ok"),
            "the python client failed over the {name}: {stdout}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        for step in [
            "one machine",
            "WaitMachine: started",
            "the guest's page over HTTP",
            "ListRoutes has",
            "INVALID_ARGUMENT naming the field",
            "DestroyMachine: destroyed",
        ] {
            assert!(stdout.contains(step), "{name}: no {step:?} in {stdout}");
        }
    }
    support::assert_audit_clean(&mut client).await;
    daemon.assert_no_host_leftovers();
}
