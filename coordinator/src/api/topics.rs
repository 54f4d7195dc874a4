//! `tcc.v1.Topics`: the domain side of the try phase.

use std::sync::Arc;

use tcc_proto::v1::{self, topics_server::Topics};
use tonic::{Request, Response, Status};

use super::convert;
use crate::engine::Engine;
use crate::engine::validate::NewCommand;
use crate::model::PartialId;

/// The Topics service.
pub struct TopicsApi {
    engine: Arc<Engine>,
}

impl TopicsApi {
    /// A service over `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        TopicsApi { engine }
    }
}

#[tonic::async_trait]
impl Topics for TopicsApi {
    async fn append(&self, request: Request<v1::AppendRequest>) -> Result<Response<v1::AppendResponse>, Status> {
        let req = request.into_inner();
        let partial = PartialId::parse("partial_id", &req.partial_id)?;
        let commands =
            req.commands.into_iter().map(|c| NewCommand { kind: c.r#type, key: c.key, payload: c.payload }).collect();
        let service = (!req.service.is_empty()).then_some(req.service.as_str());
        let (receipt, duplicate) = self.engine.append(partial, service, commands, &req.idempotency_key).await?;
        Ok(Response::new(v1::AppendResponse {
            first_sequence: receipt.first_sequence,
            last_sequence: receipt.last_sequence,
            duplicate,
        }))
    }

    async fn read(&self, request: Request<v1::ReadRequest>) -> Result<Response<v1::ReadResponse>, Status> {
        let req = request.into_inner();
        let partial = PartialId::parse("partial_id", &req.partial_id)?;
        let (txn, participant, commands) =
            self.engine.read_topic(partial, req.from_sequence, req.limit as usize).await?;
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
