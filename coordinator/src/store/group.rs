//! Grouping for a database store: concurrent writes share one database
//! transaction, so they cost one commit (one WAL flush, one round trip of
//! pipelined statements) instead of one each (group commit); concurrent
//! reads of the same kind share one query.
//!
//! Callers submit jobs to one queue; a few tasks each take what has queued
//! up (at most [`Group::start`]'s `max_batch`) and run it through an
//! [`Executor`]:
//!
//! * **One job** runs alone ([`Executor::alone`]): a lone write on an idle
//!   store waits for nobody.
//! * **Several** run together ([`Executor::together`]), sorted by their
//!   key (the transaction id), so that every batch, of any coordinator,
//!   takes its row locks in the same order: two batches cannot deadlock.
//! * **If the batch fails as a whole** (one statement failed, which aborts
//!   the database transaction, so nothing of it was written), each job runs
//!   again alone, so one bad write fails only itself.
//!
//! A write's result reaches its submitter only after the database
//! transaction that wrote it committed (durable on return), or with the
//! error that says why not; a read runs after it was submitted, so it sees
//! every write acknowledged before. Jobs of one submitter that are not in
//! flight at the same time are in batches in the order submitted; the
//! engine never has two writes of one transaction in flight, so batching
//! changes no outcome, only the number of commits.
//!
//! A job whose submitter gave up while it was queued (a cancelled request)
//! is dropped, not run. At most [`QUEUE_LIMIT`] jobs wait in a queue; more
//! are refused with UNAVAILABLE, so a slow database pushes back on its
//! callers instead of queueing without bound.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{Error, Result};

/// Runs jobs against the database.
pub trait Executor: Send + Sync + 'static {
    /// One write or read.
    type Job: Send + Sync + 'static;
    /// What one job gives.
    type Output: Send + 'static;

    /// The key jobs are ordered by within a batch (the row they lock first).
    fn key(job: &Self::Job) -> uuid::Uuid;

    /// Runs `jobs` in one database transaction and commits it. Returns each
    /// job's result (in order), or `Err` if the transaction failed as a
    /// whole and wrote nothing (so that running each job again is safe).
    #[allow(clippy::type_complexity)]
    fn together(
        &self,
        jobs: &[&Self::Job],
    ) -> impl Future<Output = std::result::Result<Vec<Result<Self::Output>>, Error>> + Send;

    /// Runs one job in a transaction of its own.
    fn alone(&self, job: &Self::Job) -> impl Future<Output = Result<Self::Output>> + Send;
}

type Queued<E> = (<E as Executor>::Job, oneshot::Sender<Result<<E as Executor>::Output>>);

/// The queue and its tasks. Dropping it ends the tasks once the queue is
/// empty.
pub struct Group<E: Executor> {
    queue: mpsc::Sender<Queued<E>>,
    /// The tasks' end, so tests can see what is queued. (Not held
    /// otherwise: if every task were gone, the queue would close and
    /// `submit` fail instead of wait.)
    #[cfg(test)]
    pending: Arc<Mutex<mpsc::Receiver<Queued<E>>>>,
}

/// Most jobs waiting in one queue; more are refused (UNAVAILABLE) rather
/// than queued without bound while the database is slow.
pub const QUEUE_LIMIT: usize = 4096;

impl<E: Executor> Group<E> {
    /// Starts `writers` tasks on `executor`, each running at most
    /// `max_batch` jobs at a time.
    pub fn start(executor: Arc<E>, writers: usize, max_batch: usize) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_LIMIT);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(executor.clone(), rx.clone(), max_batch.max(1)));
        }

        Group {
            queue,
            #[cfg(test)]
            pending: rx,
        }
    }

    /// Submits a job and waits for its result.
    pub async fn submit(&self, job: E::Job) -> Result<E::Output> {
        let (tx, rx) = oneshot::channel();
        let stopped = || Error::Unavailable("the database queue stopped (shutting down)".to_string());
        self.queue.try_send((job, tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Unavailable(format!(
                "the database is behind: {QUEUE_LIMIT} requests are waiting for it on this coordinator; retry later"
            )),
            mpsc::error::TrySendError::Closed(_) => stopped(),
        })?;
        rx.await.map_err(|_| stopped())?
    }
}

/// One writer task: takes what is queued, runs it, answers.
async fn writer<E: Executor>(executor: Arc<E>, rx: Arc<Mutex<mpsc::Receiver<Queued<E>>>>, max: usize) {
    loop {
        let mut batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        // A submitter that gave up (its request was cancelled) is not
        // waiting for its answer: its job is dropped, not run.
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if batch.len() == 1 {
            if let Some((job, reply)) = batch.pop() {
                let _ = reply.send(executor.alone(&job).await);
            }
            continue;
        }
        batch.sort_by_key(|(job, _)| E::key(job)); // stable: a submitter's order is kept
        let jobs: Vec<&E::Job> = batch.iter().map(|(job, _)| job).collect();
        match executor.together(&jobs).await {
            Ok(results) if results.len() == batch.len() => {
                for ((_, reply), result) in batch.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Ok(results) => {
                let cause = format!("the database batch gave {} results for {} jobs", results.len(), batch.len());
                for (_, reply) in batch {
                    let _ = reply.send(Err(Error::Storage(cause.clone())));
                }
            }
            Err(cause) => {
                tracing::debug!(writes = batch.len(), %cause, "a grouped write failed; running each alone");
                for (job, reply) in batch {
                    let _ = reply.send(executor.alone(&job).await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    /// A job: its key, and whether it "fails" (aborting a batch it is in).
    #[derive(Debug)]
    struct Job(u128, bool);

    /// Records the batches it was given; the first call waits for `go`.
    #[derive(Default)]
    struct Fake {
        batches: StdMutex<Vec<Vec<u128>>>,
        started: tokio::sync::Notify,
        go: tokio::sync::Notify,
        gate: std::sync::atomic::AtomicBool,
    }

    impl Fake {
        async fn wait_gate(&self) {
            if self.gate.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.started.notify_one();
                self.go.notified().await;
            }
        }
    }

    impl Executor for Fake {
        type Job = Job;
        type Output = bool;
        fn key(job: &Job) -> uuid::Uuid {
            uuid::Uuid::from_u128(job.0)
        }
        async fn together(&self, jobs: &[&Job]) -> std::result::Result<Vec<Result<bool>>, Error> {
            self.wait_gate().await;
            crate::lock(&self.batches).push(jobs.iter().map(|j| j.0).collect());
            if jobs.iter().any(|j| j.1) {
                return Err(Error::Storage("a statement failed; the transaction rolled back".into()));
            }
            Ok(jobs.iter().map(|_| Ok(true)).collect())
        }
        async fn alone(&self, job: &Job) -> Result<bool> {
            self.wait_gate().await;
            crate::lock(&self.batches).push(vec![job.0]);
            if job.1 { Err(Error::Storage(format!("job {} is bad", job.0))) } else { Ok(true) }
        }
    }

    type Handle = tokio::task::JoinHandle<Result<bool>>;

    /// A group with one writer (batches of at most `max`), busy with job
    /// 100 until `fake.go` is notified.
    async fn busy(max: usize) -> (Arc<Fake>, Arc<Group<Fake>>, Handle) {
        let fake = Arc::new(Fake::default());
        fake.gate.store(true, std::sync::atomic::Ordering::SeqCst);
        let group = Arc::new(Group::start(fake.clone(), 1, max));
        let first = submit(&group, 100, false);
        fake.started.notified().await; // the writer is busy with job 100
        (fake, group, first)
    }

    fn submit(group: &Arc<Group<Fake>>, key: u128, bad: bool) -> Handle {
        let g = group.clone();
        tokio::spawn(async move { g.submit(Job(key, bad)).await })
    }

    /// Queues `jobs` behind the busy writer, lets it go, and returns each
    /// job's result and the batches the executor was given.
    async fn run_queued(max: usize, jobs: &[(u128, bool)]) -> (Vec<Result<bool>>, Vec<Vec<u128>>) {
        let (fake, group, first) = busy(max).await;
        let handles: Vec<_> = jobs.iter().map(|&(k, bad)| submit(&group, k, bad)).collect();
        while !all_queued(&group, jobs.len()) {
            tokio::task::yield_now().await;
        }
        fake.go.notify_one();
        assert!(matches!(first.await, Ok(Ok(true))));
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.unwrap_or_else(|e| Err(Error::Storage(e.to_string()))));
        }
        let batches = crate::lock(&fake.batches).clone();
        (results, batches)
    }

    /// Whether `n` jobs wait in the queue (the writer, blocked in the
    /// executor, does not hold the receiver).
    fn all_queued(group: &Group<Fake>, n: usize) -> bool {
        group.pending.try_lock().is_ok_and(|rx| rx.len() >= n)
    }

    /// While the only writer is busy, the jobs that queue up are committed
    /// together, sorted by key; a lone job runs alone.
    #[tokio::test]
    async fn queued_jobs_share_one_commit_in_key_order() {
        let (results, batches) = run_queued(64, &[(5, false), (3, false), (9, false), (1, false)]).await;
        assert!(results.iter().all(|r| matches!(r, Ok(true))), "{results:?}");
        assert_eq!(batches, vec![vec![100], vec![1, 3, 5, 9]]);
    }

    /// A bad job fails its batch; every job then runs alone, so the good
    /// ones are written and only the bad one fails.
    #[tokio::test]
    async fn a_failed_batch_is_run_again_one_by_one() {
        let (results, batches) = run_queued(64, &[(1, false), (2, true), (3, false)]).await;
        assert!(matches!(results[0], Ok(true)) && matches!(results[2], Ok(true)), "{results:?}");
        assert!(matches!(results[1], Err(Error::Storage(ref m)) if m == "job 2 is bad"), "{results:?}");
        assert_eq!(batches, vec![vec![100], vec![1, 2, 3], vec![1], vec![2], vec![3]]);
    }

    /// The batch size is bounded.
    #[tokio::test]
    async fn batches_hold_at_most_max_jobs() {
        let jobs: Vec<_> = (1u128..=7).map(|k| (k, false)).collect();
        let (results, batches) = run_queued(3, &jobs).await;
        assert!(results.iter().all(|r| matches!(r, Ok(true))), "{results:?}");
        assert_eq!(batches, vec![vec![100], vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
    }

    /// A job whose submitter gave up while it was queued is not run.
    #[tokio::test]
    async fn a_job_given_up_while_queued_is_not_run() {
        let (fake, group, first) = busy(64).await;
        let given_up = submit(&group, 1, false);
        let kept = submit(&group, 2, false);
        while !all_queued(&group, 2) {
            tokio::task::yield_now().await;
        }
        given_up.abort();
        assert!(given_up.await.is_err_and(|e| e.is_cancelled()));
        fake.go.notify_one();
        assert!(matches!(first.await, Ok(Ok(true))));
        assert!(matches!(kept.await, Ok(Ok(true))));
        let batches = crate::lock(&fake.batches).clone();
        assert_eq!(batches, vec![vec![100], vec![2]]);
    }
}
