//! Connecting to hearthd's Unix socket: used by the `hearth` CLI, tests and benchmarks.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

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
    let channel = channel(socket).await?;
    Ok(Client {
        machines: MachineServiceClient::new(channel.clone()),
        node: NodeServiceClient::new(channel.clone()),
        registry: RegistryServiceClient::new(channel.clone()),
        images: ImageServiceClient::new(channel),
    })
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
