//! The fabric's dedicated OS threads: the only threads that ever change namespace.
//!
//! `setns` and `unshare` act on the calling thread. On a tokio worker that would silently
//! move every other task scheduled there into a machine's namespace, so namespace work
//! runs here instead, as jobs sent over a channel, and the async caller awaits the answer.
//!
//! Invariants:
//! - A worker is in the root namespace whenever it is not running a job: it goes back
//!   before every job and after every job, and only answers after going back. A thread
//!   left inside would keep a removed namespace (and its veth) alive.
//! - Jobs for the same namespace name always go to the same worker, so they run one at a
//!   time in the order they were sent: two calls for one machine never interleave.
//! - A job runs to the end even when its caller stops waiting (a cancelled task): the
//!   host is never left half-changed by a dropped future.

use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::thread;

use tokio::sync::oneshot;

use super::error::NetError;
use super::netlink::Rtnl;
use super::netns;

/// What a job gets: the way back to the root namespace and a socket that talks to it.
pub(crate) struct Worker {
    root_ns: File,
    /// Opened in the root namespace when the thread started; stays bound to it wherever
    /// the thread goes.
    pub root: Rtnl,
}

impl Worker {
    fn return_to_root(&self) -> Result<(), NetError> {
        netns::enter("(root)", &self.root_ns)
            .map_err(|e| NetError::Worker(format!("cannot return to the root namespace: {e}")))
    }
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// A fixed set of worker threads. The threads end when this is dropped.
pub(crate) struct Workers {
    queues: Vec<mpsc::Sender<Job>>,
}

impl Workers {
    /// Starts `count` threads. The calling thread's network namespace is what the
    /// workers treat as the root namespace.
    pub fn start(count: usize) -> Result<Workers, NetError> {
        let root_ns = File::open("/proc/thread-self/ns/net").map_err(|source| NetError::Netns {
            name: "(root)".to_string(),
            action: "open",
            source,
        })?;
        let mut queues = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let (jobs, queue) = mpsc::channel::<Job>();
            let (ready_tx, ready) = mpsc::sync_channel(1);
            let ns = root_ns.try_clone().map_err(|e| {
                NetError::Worker(format!("duplicate the root namespace handle: {e}"))
            })?;
            thread::Builder::new()
                .name(format!("hearth-net-{i}"))
                .spawn(move || worker_main(ns, queue, ready_tx))
                .map_err(|e| NetError::Worker(format!("spawn thread {i}: {e}")))?;
            ready
                .recv()
                .map_err(|_| NetError::Worker(format!("thread {i} ended while starting")))??;
            queues.push(jobs);
        }
        Ok(Workers { queues })
    }

    /// Runs `job` on the worker that owns `key` and returns its result. The job starts in
    /// the root namespace and may enter any other; the worker returns to the root
    /// namespace before the result is delivered.
    pub async fn run<T, F>(&self, key: &str, job: F) -> Result<T, NetError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Worker) -> Result<T, NetError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let wrapped: Job = Box::new(move |worker: &mut Worker| {
            let result = worker.return_to_root().and_then(|()| {
                catch_unwind(AssertUnwindSafe(|| job(worker)))
                    .unwrap_or_else(|_| Err(NetError::Worker("a network job panicked".to_string())))
            });
            let back = worker.return_to_root();
            let _ = reply.send(back.and(result));
        });
        self.queues[self.index(key)]
            .send(wrapped)
            .map_err(|_| NetError::Worker("the worker thread is gone".to_string()))?;
        answer
            .await
            .map_err(|_| NetError::Worker("the worker thread dropped the job".to_string()))?
    }

    /// FNV-1a of the key: stable, cheap, spreads machine ids evenly.
    fn index(&self, key: &str) -> usize {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (hash % self.queues.len() as u64) as usize
    }
}

fn worker_main(
    root_ns: File,
    queue: mpsc::Receiver<Job>,
    ready: mpsc::SyncSender<Result<(), NetError>>,
) {
    let started = netns::enter("(root)", &root_ns).and_then(|()| {
        Rtnl::open().map_err(|source| NetError::Netlink {
            place: "root namespace".to_string(),
            action: "open a netlink socket".to_string(),
            source,
        })
    });
    let mut worker = match started {
        Ok(root) => Worker { root_ns, root },
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    while let Ok(job) = queue.recv() {
        job(&mut worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_name() -> String {
        let mut raw = [0u8; 4];
        getrandom::fill(&mut raw).expect("random");
        format!("hwt-{}", hex::encode(raw))
    }

    /// Needs root: creates (and deletes) a namespace.
    #[tokio::test]
    async fn a_worker_is_back_in_the_root_namespace_before_it_answers() {
        let workers = Workers::start(1).expect("start");
        let name = random_name();
        let job_name = name.clone();
        let tid = workers
            .run("key", move |_| {
                netns::create_and_enter(&job_name)?;
                Ok(nix::unistd::gettid())
            })
            .await;
        let cleanup = netns::delete(&name);
        let tid = tid.expect("job");
        cleanup.expect("delete");
        let root = std::fs::read_link("/proc/self/ns/net").expect("root");
        let worker = std::fs::read_link(format!("/proc/self/task/{tid}/ns/net")).expect("worker");
        assert_eq!(worker, root);
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_worker_carries_on() {
        let workers = Workers::start(1).expect("start");
        let failed = workers
            .run("key", |_| -> Result<(), NetError> { panic!("job panics") })
            .await;
        assert!(matches!(failed, Err(NetError::Worker(_))), "{failed:?}");
        let answer = workers.run("key", |_| Ok(7)).await.expect("next job");
        assert_eq!(answer, 7);
    }

    #[tokio::test]
    async fn one_key_always_goes_to_one_worker() {
        let workers = Workers::start(3).expect("start");
        for key in ["hth-0a1b2c3d4e", "hth-ffffffffff", "x"] {
            let first = workers
                .run(key, |_| Ok(nix::unistd::gettid()))
                .await
                .expect("job");
            for _ in 0..5 {
                let again = workers
                    .run(key, |_| Ok(nix::unistd::gettid()))
                    .await
                    .expect("job");
                assert_eq!(again, first, "{key}");
            }
        }
    }
}
