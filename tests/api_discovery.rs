//! What a generic gRPC tool sees on hearthd's socket and on its TCP listener (mutual
//! TLS): `grpc.health.v1` answers SERVING for the daemon and each service, and server
//! reflection lists the four services (and describes them), so grpcurl-style tools work
//! without the `.proto` files. On TCP, a client without a certificate, with one from
//! another CA, or without TLS at all is refused.

mod support;

use hearth::api::pb;
use support::Daemon;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const SERVICES: [&str; 4] = [
    "hearth.v1.MachineService",
    "hearth.v1.NodeService",
    "hearth.v1.ImageService",
    "hearth.v1.RegistryService",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_and_reflection_lists_the_services() {
    let daemon = Daemon::start_with("");
    // Wait until the daemon answers at all.
    let _ = daemon.client().await;
    let channel = hearth::client::channel(daemon.dir.path().join("api.sock"))
        .await
        .expect("channel");
    discover(channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_with_mutual_tls_serves_the_same_and_refuses_strangers() {
    let mut daemon = Daemon::prepare("");
    let pki = support::tls::Pki::make(&daemon.dir.path().join("pki"));
    daemon.rewrite_config(|text| support::tls::with_api_keys(text, &pki.api_keys()));
    daemon.spawn();
    let mut local = daemon.client().await;
    let node = support::node(&mut local).await;
    let port = node
        .api_address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("GetNode names the TCP listener: {:?}", node.api_address));
    println!("TCP listener at {}", node.api_address);

    // By name (localhost) and by address (127.0.0.1): both are in the certificate.
    for url in [
        format!("https://localhost:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        let channel = hearth::client::channel_tls(&url, &pki.client(false))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:?}"));
        let mut remote = hearth::client::Client::over(channel.clone());
        let answer = support::node(&mut remote).await;
        assert_eq!(answer.version, node.version);
        discover(channel).await;
    }

    let url = format!("https://127.0.0.1:{port}");
    // A certificate from another CA: the handshake fails, so no call gets through.
    // Refused means the connection or the first call fails: not a hang (which the
    // timeout in call_node would turn into an error too).
    let refused = |what: &str, outcome: Result<pb::Node, String>| match outcome {
        Ok(node) => panic!("{what}: answered {node:?}"),
        Err(e) => {
            assert!(!e.contains(NO_ANSWER), "{what}: {e}");
            println!("{what}: refused: {e}");
        }
    };
    let stranger = call_node(&url, Some(pki.client(true))).await;
    refused("a client of another CA", stranger);
    // No certificate at all (the server's CA trusted, TLS otherwise fine).
    let mut anonymous = pki.client(false);
    anonymous.cert.clear();
    anonymous.key.clear();
    refused(
        "a client without a certificate",
        call_node(&url, Some(anonymous)).await,
    );
    // Plain HTTP/2 without TLS.
    refused(
        "a client without TLS",
        call_node(&format!("http://127.0.0.1:{port}"), None).await,
    );
    // The CLI over TCP: with the client's certificate it answers; with the other CA's it
    // fails cleanly, naming the address.
    let cli = |cert: &str, key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["--json", "--address", &url, "--tls-ca"])
            .arg(pki.path("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.path(cert))
            .arg("--tls-key")
            .arg(pki.path(key))
            .arg("node")
            .output()
            .expect("run hearth")
    };
    let out = cli("client.pem", "client.key");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains(&node.version), "{shown}");
    let out = cli("other-client.pem", "other-client.key");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("panicked"), "{said}");
    assert!(
        said.contains("api.tls_client_ca"),
        "the CLI says what to check: {said}"
    );
    println!("the CLI with another CA's certificate: {}", said.trim());
    // The daemon is still there for its rightful clients.
    let channel = hearth::client::channel_tls(&url, &pki.client(false))
        .await
        .expect("a valid client after the refusals");
    let _ = support::node(&mut hearth::client::Client::over(channel)).await;
}

/// A TLS file the daemon cannot use stops its start, naming the key: a key that is not
/// the certificate's, a CA file without a certificate, a missing file.
#[test]
fn a_bad_tls_file_stops_the_start_naming_its_key() {
    let daemon = Daemon::prepare("");
    let pki = support::tls::Pki::make(&daemon.dir.path().join("pki"));
    let config = daemon.dir.path().join("hearthd.toml");
    let original = std::fs::read_to_string(&config).expect("config");
    let cases = [
        (
            "other-client.key",
            "ca.pem",
            "api.tls_key",
            "does not fit api.tls_cert",
        ),
        (
            "server.key",
            "server.key",
            "api.tls_client_ca",
            "no PEM certificate",
        ),
        (
            "server.key",
            "missing.pem",
            "api.tls_client_ca",
            "No such file",
        ),
    ];
    for (key, ca, named, why) in cases {
        let keys = format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
            pki.path("server.pem").display(),
            pki.path(key).display(),
            pki.path(ca).display(),
        );
        std::fs::write(
            &config,
            support::tls::with_api_keys(original.clone(), &keys),
        )
        .expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearthd"))
            .arg("--config")
            .arg(&config)
            .env("HEARTH_LOG", "off")
            .output()
            .expect("run hearthd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "hearthd started with {key}/{ca}: {stderr}"
        );
        assert!(
            stderr.contains(named) && stderr.contains(why),
            "{named}, {why}: {stderr}"
        );
        println!("{key}/{ca}: {}", stderr.trim());
    }
    assert!(
        !daemon.dir.path().join("data").exists(),
        "nothing was made before the TLS files were checked"
    );
}

/// What `call_node` says when the daemon neither answers nor refuses.
const NO_ANSWER: &str = "no answer in 10 s";

/// GetNode over a fresh connection to `url`, with `tls` (or in the clear).
async fn call_node(url: &str, tls: Option<hearth::client::TlsClient>) -> Result<pb::Node, String> {
    let channel = match tls {
        Some(tls) if tls.cert.is_empty() => {
            let config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca));
            tonic::transport::Endpoint::from_shared(url.to_string())
                .map_err(|e| e.to_string())?
                .tls_config(config)
                .map_err(|e| e.to_string())?
                .connect()
                .await
        }
        Some(tls) => hearth::client::channel_tls(url, &tls).await,
        None => {
            tonic::transport::Endpoint::from_shared(url.to_string())
                .map_err(|e| e.to_string())?
                .connect()
                .await
        }
    };
    let channel = channel.map_err(|e| format!("connect: {e:?}"))?;
    let mut client = hearth::client::Client::over(channel);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.node.get_node(pb::GetNodeRequest {}),
    )
    .await
    .map_err(|_| NO_ANSWER.to_string())?
    .map(|r| r.into_inner())
    .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
}

/// Health and reflection over `channel`.
async fn discover(channel: tonic::transport::Channel) {
    let mut health = HealthClient::new(channel.clone());
    for service in std::iter::once("").chain(SERVICES) {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "hearth.v1.MachineService".into(),
            )),
        ]))
        .await
        .expect("reflection")
        .into_inner();
    let listed = answers.message().await.expect("list").expect("an answer");
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("not a service list: {listed:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    println!("reflection lists: {names:?}");
    for service in SERVICES {
        assert!(names.iter().any(|n| n == service), "{service} in {names:?}");
    }
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
    let file = answers.message().await.expect("file").expect("an answer");
    let Some(MessageResponse::FileDescriptorResponse(files)) = file.message_response else {
        panic!("not a file: {file:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

/// The TCP listener holds at most `TCP_PER_CLIENT` connections of one address: a client
/// that opens many more (and never says a word) finds the rest closed at once, the
/// daemon's descriptors stay bounded, and once it lets go a real client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_listener_caps_one_clients_connections() {
    use std::io::Read;
    let mut daemon = Daemon::prepare("");
    let pki = support::tls::Pki::make(&daemon.dir.path().join("pki"));
    daemon.rewrite_config(|text| support::tls::with_api_keys(text, &pki.api_keys()));
    daemon.spawn();
    let mut local = daemon.client().await;
    let address = support::node(&mut local).await.api_address;
    let before = daemon.open_fds();
    let cap = hearth::api::server::TCP_PER_CLIENT;
    let held: Vec<std::net::TcpStream> = (0..cap + 100)
        .map(|_| std::net::TcpStream::connect(&address).expect("connect"))
        .collect();
    // Those over the cap are closed by the daemon: a read ends (EOF or reset) at once.
    let mut closed = 0;
    for mut stream in &held {
        stream
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    let during = daemon.open_fds();
    println!(
        "api cap: {} connections opened, {closed} closed by the daemon; descriptors {before} \
         before, {during} while held",
        held.len()
    );
    assert!(closed >= 100, "only {closed} of {} closed", held.len());
    assert!(
        during <= before + cap + 16,
        "descriptors {before} -> {during}"
    );
    drop(held);
    let url = format!("https://{address}");
    let channel = hearth::client::channel_tls(&url, &pki.client(false))
        .await
        .expect("a real client after");
    let mut remote = hearth::client::Client::over(channel);
    support::node(&mut remote).await;
}
