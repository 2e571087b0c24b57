//! Serving the API on a Unix socket (mode 0600: only the daemon's user may call it).
//! Each connection is read through [`super::authority::Normalised`], so clients that send
//! the socket's path as `:authority` (gRPC's C core, Java) work with default settings.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ractor::ActorRef;
use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use super::authority::Normalised;

use super::images::Images;
use super::machines::Machines;
use super::node::Node;
use super::pb::image_service_server::ImageServiceServer;
use super::pb::machine_service_server::MachineServiceServer;
use super::pb::node_service_server::NodeServiceServer;
use super::pb::registry_service_server::RegistryServiceServer;
use super::registry::Registry;
use crate::actors::services::Services;
use crate::actors::supervisor::SupervisorMsg;

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Why the API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not read the descriptors built in.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    services: Services,
    supervisor: ActorRef<SupervisorMsg>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    // grpc.health.v1: the daemon and each service SERVING while it listens.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MachineServiceServer<Machines>>().await;
    health.set_serving::<NodeServiceServer<Node>>().await;
    health.set_serving::<ImageServiceServer<Images>>().await;
    health
        .set_serving::<RegistryServiceServer<Registry>>()
        .await;
    // Server reflection (v1 and the older v1alpha that some tools still ask), so
    // grpcurl-style tools can list and call the services without the .proto files.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(super::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(MachineServiceServer::new(Machines::new(
            services.clone(),
            supervisor,
        )))
        .add_service(NodeServiceServer::new(Node::new(services.clone())))
        .add_service(ImageServiceServer::new(Images::new(services.stopping())))
        .add_service(RegistryServiceServer::new(Registry::new(services)))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|conn| conn.map(Normalised::new)),
            shutdown,
        )
        .await?;
    Ok(())
}
