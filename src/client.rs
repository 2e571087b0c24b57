//! Connecting to hearthd, on its Unix socket or over TCP with mutual TLS: used by the
//! `hearth` CLI, tests and benchmarks.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::api::pb::image_service_client::ImageServiceClient;
use crate::api::pb::machine_service_client::MachineServiceClient;
use crate::api::pb::node_service_client::NodeServiceClient;
use crate::api::pb::registry_service_client::RegistryServiceClient;

/// Clients of the services over one connection.
#[derive(Clone)]
pub struct Client {
    /// MachineService.
    pub machines: MachineServiceClient<Channel>,
    /// NodeService.
    pub node: NodeServiceClient<Channel>,
    /// RegistryService.
    pub registry: RegistryServiceClient<Channel>,
    /// ImageService.
    pub images: ImageServiceClient<Channel>,
}

/// Connects to the daemon listening on `socket`.
pub async fn connect(socket: impl Into<PathBuf>) -> Result<Client, tonic::transport::Error> {
    Ok(Client::over(channel(socket).await?))
}

impl Client {
    /// Clients of every service over `channel`.
    pub fn over(channel: Channel) -> Client {
        Client {
            machines: MachineServiceClient::new(channel.clone()),
            node: NodeServiceClient::new(channel.clone()),
            registry: RegistryServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }
}

/// What a client shows a daemon's TCP listener (`api.listen`): the CA that signed the
/// daemon's certificate, and its own certificate and key (PEM).
pub struct TlsClient {
    /// The CA to trust for the server's certificate.
    pub ca: Vec<u8>,
    /// The client's certificate chain.
    pub cert: Vec<u8>,
    /// The client's private key.
    pub key: Vec<u8>,
    /// The name to expect in the server's certificate (defaults to the URL's host).
    pub server_name: Option<String>,
}

/// A channel to the daemon's TCP listener at `url` (`https://host:port`), with mutual TLS.
pub async fn channel_tls(url: &str, tls: &TlsClient) -> Result<Channel, tonic::transport::Error> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca))
        .identity(Identity::from_pem(&tls.cert, &tls.key));
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Endpoint::from_shared(url.to_string())?
        .tls_config(config)?
        .connect()
        .await
}

/// A channel to the daemon listening on `socket`, for any service it serves (health and
/// reflection too).
pub async fn channel(socket: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.into();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://hearthd.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}
