//! RegistryService: the embedded registry's routes, listed and watched.

use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::convert;
use super::machines::async_stream;
use super::pb::{self, registry_service_server::RegistryService};
use super::status::ApiError;
use crate::actors::etcd_sink::pending_for;
use crate::actors::services::Services;
use crate::route::RouteChange;

/// The registry API.
pub struct Registry {
    services: Services,
}

impl Registry {
    /// Over the services.
    pub fn new(services: Services) -> Self {
        Registry { services }
    }
}

type RouteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RouteChange, Status>> + Send>>;

#[tonic::async_trait]
impl RegistryService for Registry {
    async fn list_routes(
        &self,
        _: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let routes = self.services.store().routes().map_err(ApiError::from)?;
        let sink = crate::actors::etcd_sink::status(&self.services);
        Ok(Response::new(pb::ListRoutesResponse {
            routes: routes
                .iter()
                .map(|route| {
                    let mut shown = convert::route(route);
                    shown.pending_sinks = pending_for(sink.as_ref(), &route.machine_id);
                    shown
                })
                .collect(),
        }))
    }

    type WatchRoutesStream = RouteStream;

    async fn watch_routes(
        &self,
        _: Request<pb::WatchRoutesRequest>,
    ) -> Result<Response<RouteStream>, Status> {
        // Subscribe first, then snapshot: a change in between is seen twice, never lost.
        let mut live = self.services.subscribe_routes();
        let snapshot = self.services.store().routes().map_err(ApiError::from)?;
        let stream = async_stream(self.services.stopping(), move |tx| async move {
            for route in snapshot {
                let change = convert::route_change(&RouteChange::Published(route));
                if tx.send(Ok(change)).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(change) => {
                        if tx.send(Ok(convert::route_change(&change))).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "{n} route changes missed; list and watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }
}
