//! What a generic gRPC tool sees on hearthd's socket: `grpc.health.v1` answers SERVING for
//! the daemon and each service, and server reflection lists the four services (and
//! describes them), so grpcurl-style tools work without the `.proto` files.

mod support;

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
