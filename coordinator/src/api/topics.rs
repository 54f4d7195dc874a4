//! `tcc.v1.Topics`: the domain side of the try phase.

use std::sync::Arc;

use tcc_proto::v1::{self, topics_server::Topics};
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::{Access, Caller};
use crate::engine::Engine;
use crate::engine::topics::Appender;
use crate::engine::validate::NewCommand;
use crate::model::PartialId;

/// The Topics service.
pub struct TopicsApi {
    engine: Arc<Engine>,
    access: Arc<Access>,
}

impl TopicsApi {
    /// A service over `engine`, under `access`.
    pub fn new(engine: Arc<Engine>, access: Arc<Access>) -> Self {
        TopicsApi { engine, access }
    }
}

#[tonic::async_trait]
impl Topics for TopicsApi {
    async fn append(&self, request: Request<v1::AppendRequest>) -> Result<Response<v1::AppendResponse>, Status> {
        const RPC: &str = "Topics.Append";
        let caller = self.access.caller(&request, RPC)?;
        let req = request.into_inner();
        let partial = PartialId::parse("partial_id", &req.partial_id)?;
        let commands =
            req.commands.into_iter().map(|c| NewCommand { kind: c.r#type, key: c.key, payload: c.payload }).collect();
        let appender = match &caller {
            Caller::Known { name, .. } => Appender::Identity(name),
            Caller::Anyone if req.service.is_empty() => Appender::Anyone,
            Caller::Anyone => Appender::Declared(&req.service),
        };
        let (receipt, duplicate) =
            self.engine.append(partial, appender, commands, &req.idempotency_key).await.map_err(|e| match e {
                // Another service's partial: answered as one that does not
                // exist (the refusal is logged and counted).
                e @ crate::error::Error::PermissionDenied(_) => {
                    self.access.refuse(&caller, RPC, e);
                    crate::error::Error::partial_not_found(partial)
                }
                e => e,
            })?;
        Ok(Response::new(v1::AppendResponse {
            first_sequence: receipt.first_sequence,
            last_sequence: receipt.last_sequence,
            duplicate,
        }))
    }

    async fn read(&self, request: Request<v1::ReadRequest>) -> Result<Response<v1::ReadResponse>, Status> {
        let caller = self.access.caller(&request, "Topics.Read")?;
        let req = request.into_inner();
        let partial = PartialId::parse("partial_id", &req.partial_id)?;
        let (txn, participant, commands) =
            self.engine.read_topic(partial, req.from_sequence, req.limit as usize).await?;
        self.access.partial(&caller, "Topics.Read", partial, &participant.service, true)?;
        let next_sequence = match commands.last() {
            Some(last) if last.sequence < participant.command_count => last.sequence + 1,
            _ => 0,
        };
        Ok(Response::new(v1::ReadResponse {
            commands: commands.into_iter().map(convert::command).collect(),
            next_sequence,
            transaction_id: txn.id.to_string(),
            service: participant.service,
            state: convert::state(txn.state).into(),
        }))
    }
}
