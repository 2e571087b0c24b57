//! Serving the API: on a Unix socket (mode 0600: only the daemon's user may call it), and,
//! for remote control planes, on TCP with mutual TLS (rustls through tonic). Both serve
//! the same services, health and reflection. Each socket connection is read through
//! [`super::authority::Normalised`], so clients that send the socket's path as
//! `:authority` (gRPC's C core, Java) work with default settings.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ractor::ActorRef;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::authority::Normalised;

use super::images::Images;
use super::machines::Machines;
use super::node::Node;
use super::pb::image_service_server::ImageServiceServer;
use super::pb::machine_service_server::MachineServiceServer;
use super::pb::node_service_server::NodeServiceServer;
use super::pb::registry_service_server::RegistryServiceServer;
use super::registry::Registry;
use super::timing::TimingLayer;
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
    /// A TLS file could not be read.
    #[error("{key} {path}: {source}")]
    TlsFile {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A TLS file was read but cannot be used (no certificate in it, a key that is not
    /// the certificate's).
    #[error("{key} {path}: {reason}")]
    Tls {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The server failed.
    #[error("{}", chain(.0))]
    Transport(#[from] tonic::transport::Error),
}

/// An error with its causes (tonic's own message leaves them out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// How long a TCP client has to finish the TLS handshake; a connection that sends
/// nothing is dropped then instead of holding a descriptor.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most TCP connections one client address may hold to the API (a control plane needs
/// a few; each costs a descriptor and, until the TLS handshake ends, a timer).
pub const TCP_PER_CLIENT: usize = 64;
/// Most TCP connections all clients together may hold to the API.
pub const TCP_TOTAL: usize = 256;

/// Where the API listens: the Unix socket always, and TCP with mutual TLS when
/// `api.listen` is set.
pub struct Listeners {
    /// The local socket (mode 0600).
    pub unix: UnixListener,
    /// The remote listener and its TLS settings.
    pub tcp: Option<(TcpListener, ServerTlsConfig)>,
}

/// Reads `api.tls_cert`, `api.tls_key` and `api.tls_client_ca`: the server's identity,
/// and the CA every client certificate must chain to (a client without one is refused
/// during the handshake). Each file is parsed here, at start, so a bad one is named by
/// its key before the daemon serves anything.
pub fn tls_settings(api: &crate::config::ApiConfig) -> Result<ServerTlsConfig, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| ServeError::TlsFile {
            key,
            path: path.to_path_buf(),
            source,
        })
    };
    let unusable = |key: &'static str, path: &Path, reason: String| ServeError::Tls {
        key,
        path: path.to_path_buf(),
        reason,
    };
    let certificates = |key: &'static str, path: &Path, pem: &[u8]| {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unusable(key, path, format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(unusable(key, path, "holds no PEM certificate".into()));
        }
        Ok(certs)
    };
    let cert = read("api.tls_cert", &api.tls_cert)?;
    let key = read("api.tls_key", &api.tls_key)?;
    let ca = read("api.tls_client_ca", &api.tls_client_ca)?;
    let chain = certificates("api.tls_cert", &api.tls_cert, &cert)?;
    let private = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        unusable(
            "api.tls_key",
            &api.tls_key,
            format!("no PEM private key: {e}"),
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for root in certificates("api.tls_client_ca", &api.tls_client_ca, &ca)? {
        roots.add(root).map_err(|e| {
            unusable(
                "api.tls_client_ca",
                &api.tls_client_ca,
                format!("not a usable CA: {e}"),
            )
        })?;
    }
    // The key must be the certificate's: rustls checks it when it builds a config.
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|builder| {
        builder
            .with_no_client_auth()
            .with_single_cert(chain, private)
    })
    .map_err(|e| {
        unusable(
            "api.tls_key",
            &api.tls_key,
            format!("does not fit api.tls_cert: {e}"),
        )
    })?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// Binds `api.listen`; the bound address is what `GetNode` reports.
pub async fn bind_tcp(address: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// The services every listener serves: the four of the API, health and reflection.
fn routes(
    services: &Services,
    supervisor: &ActorRef<SupervisorMsg>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<tonic::service::Routes, ServeError> {
    // Server reflection (v1 and the older v1alpha that some tools still ask), so
    // grpcurl-style tools can list and call the services without the .proto files.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(super::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(MachineServiceServer::new(Machines::new(
            services.clone(),
            supervisor.clone(),
        )))
        .add_service(NodeServiceServer::new(Node::new(services.clone())))
        .add_service(ImageServiceServer::new(Images::new(
            services.stopping(),
            services.config().images.local_roots.clone(),
        )))
        .add_service(RegistryServiceServer::new(Registry::new(services.clone())));
    Ok(routes.routes())
}

/// Serves every listener until the daemon begins to stop (`Services::begin_shutdown`).
pub async fn serve(
    listeners: Listeners,
    services: Services,
    supervisor: ActorRef<SupervisorMsg>,
) -> Result<(), ServeError> {
    // grpc.health.v1: the daemon and each service SERVING while it listens.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MachineServiceServer<Machines>>().await;
    health.set_serving::<NodeServiceServer<Node>>().await;
    health.set_serving::<ImageServiceServer<Images>>().await;
    health
        .set_serving::<RegistryServiceServer<Registry>>()
        .await;
    let until_stopping = |services: &Services| {
        let mut stopping = services.stopping();
        async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }
    };
    let local = tonic::transport::Server::builder()
        .layer(TimingLayer)
        .add_routes(routes(&services, &supervisor, health_service.clone())?)
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listeners.unix).map(|conn| conn.map(Normalised::new)),
            until_stopping(&services),
        );
    let Some((tcp, tls)) = listeners.tcp else {
        local.await?;
        return Ok(());
    };
    let remote = tonic::transport::Server::builder()
        .tls_config(tls)?
        .layer(TimingLayer)
        .add_routes(routes(&services, &supervisor, health_service)?)
        .serve_with_incoming_shutdown(
            crate::admit::incoming(
                tcp,
                crate::admit::Limits::new("api", TCP_PER_CLIENT, TCP_TOTAL),
            ),
            until_stopping(&services),
        );
    tokio::try_join!(local, remote)?;
    Ok(())
}
