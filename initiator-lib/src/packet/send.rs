//! Send coalescing: concurrent [`PacketClient::send`] calls queue while up to
//! [`DEFAULT_SENDS_IN_FLIGHT`] SENDs are in flight, and the next SEND carries them all;
//! each SEND runs in a task of its own, and every caller gets its own packets' outcomes.

use super::*;

/// What a SEND attempt ended with, before errors.
pub(super) enum Sent {
    /// One outcome per packet, in order.
    Outcomes(Vec<Outcome>),
    /// The batch was MIXED but another SEND on this nexus replaced its results before we
    /// asked for them.
    ResultsLost,
}

/// SEND commands one client keeps in flight at once by default. Concurrent
/// [`PacketClient::send`] calls beyond it wait in a queue, and the next SEND takes all of
/// them: 32 callers sending one packet at a time make ~6 packets per SEND (`ftss bench`)
/// instead of 32 one-packet SENDs. More than one in flight keeps the target busy while a
/// SEND's answer travels back and the next list is built; a few are enough for that.
pub const DEFAULT_SENDS_IN_FLIGHT: usize = 4;

/// What the SENDs of one [`PacketClient`] have done so far ([`PacketClient::send_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// SEND commands issued, repeats (after a lost SEND RESULTS) included.
    pub sends: u64,
    /// Packets those SENDs carried (a repeated SEND counts its packets again).
    pub packets: u64,
    /// SEND RESULTS commands issued (for SENDs whose packets had different outcomes).
    pub send_results: u64,
}

/// One caller's packets waiting for a SEND (at most one SEND's worth: [`batches`]).
pub(super) struct Queued {
    pub(super) records: Vec<SendRecord>,
    /// Encoded length of `records` in a SEND list.
    pub(super) len: usize,
    /// Where the outcomes of `records` (or the SEND's error) go.
    pub(super) reply: Reply,
}

/// Packets of concurrent callers waiting for a SEND, and the SEND tasks running.
pub(super) struct SendQueue {
    pub(super) waiting: std::collections::VecDeque<Queued>,
    /// SEND slots taken: SEND tasks running ([`Core::flush`], each sends until `waiting`
    /// is empty) and callers sending alone ([`Slot`]).
    pub(super) tasks: usize,
    /// Most slots at once, so most SENDs in flight.
    pub(super) max_tasks: usize,
}

/// Takes the callers for the next SEND from the front of the queue: as many as fit in one
/// SEND (1024 packets, 16 MiB of list), in queue order. A caller that went away (its
/// future dropped) before its packets were sent is dropped from the queue unsent: it can
/// no longer learn the outcome, and sending nothing is what dropping a send before its
/// SEND always meant.
pub(super) fn take_batch(q: &mut SendQueue) -> Vec<Queued> {
    let mut out: Vec<Queued> = Vec::new();
    let mut records = 0;
    let mut len = vendor::SEND_HEADER_LEN;
    while let Some(next) = q.waiting.front() {
        if next.reply.is_closed() {
            q.waiting.pop_front();
            continue;
        }
        // Every entry fits one SEND alone ([`batches`]), so the first is always taken.
        let full = records + next.records.len() > vendor::SEND_RECORDS_MAX
            || len + next.len > vendor::PARAM_LIST_MAX as usize;
        if !out.is_empty() && full {
            break;
        }
        let Some(next) = q.waiting.pop_front() else {
            break;
        };
        records += next.records.len();
        len += next.len;
        out.push(next);
    }
    out
}

/// Hands each caller of one SEND its share: its packets' outcomes in its order, or the
/// SEND's error (the SEND succeeded or failed as a whole, so it is every caller's).
pub(super) fn answer(batch: Vec<(usize, Reply)>, result: Result<Vec<Outcome>, Error>) {
    let outcomes = match result {
        Ok(o) if o.len() == batch.iter().map(|(n, _)| n).sum::<usize>() => o,
        Ok(o) => {
            // send_batch returns one outcome per packet; never trust that blindly.
            let e = Error::Protocol(format!(
                "{} outcomes for a SEND of {} packets",
                o.len(),
                batch.iter().map(|(n, _)| n).sum::<usize>()
            ));
            return answer_error(batch, &e);
        }
        Err(e) => return answer_error(batch, &e),
    };
    let mut rest = outcomes.into_iter();
    for (n, reply) in batch {
        // A caller that went away while its SEND was in flight just misses its answer.
        let _ = reply.send(Ok(rest.by_ref().take(n).collect()));
    }
}

pub(super) fn answer_error(batch: Vec<(usize, Reply)>, e: &Error) {
    for (_, reply) in batch {
        let _ = reply.send(Err(e.duplicate()));
    }
}

pub(super) type Reply = tokio::sync::oneshot::Sender<Result<Vec<Outcome>, Error>>;

/// What SENDs need of a client, shared with the tasks that run them: a SEND runs in a task
/// of its own so that a caller that goes away (its future dropped) cannot take the answer
/// of the other callers in that SEND with it.
pub(super) struct Core<T> {
    pub(super) transport: RwLock<Arc<T>>,
    pub(super) next_tag: AtomicU64,
    /// SENDs hold it shared; a SEND whose results another SEND replaced is repeated
    /// holding it exclusively, so that nothing can come between its SEND and SEND RESULTS.
    pub(super) send_gate: tokio::sync::RwLock<()>,
    pub(super) queue: Mutex<SendQueue>,
    pub(super) sends: AtomicU64,
    pub(super) packets_sent: AtomicU64,
    pub(super) send_results: AtomicU64,
}

impl<T: Transport> Core<T> {
    pub(super) fn transport(&self) -> Arc<T> {
        // A panic elsewhere while holding the lock cannot leave an Arc half-written.
        Arc::clone(&self.transport.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn queue(&self) -> std::sync::MutexGuard<'_, SendQueue> {
        // Every change to the queue is a push or a pop: a panic cannot leave it torn.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a command, repeating it on UNIT ATTENTION and on a data CRC error: both mean
    /// the command did nothing, and the first command of every new nexus gets the former.
    pub(super) async fn run(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, Error> {
        let t = self.transport();
        let mut tries = 0;
        loop {
            let r = t.execute(cdb, data_out.clone(), data_in_len).await?;
            let again = r.status == CHECK_CONDITION
                && matches!(sense_code(&r), Some((k, a, q))
                    if k == key::UNIT_ATTENTION
                        || (k == key::ABORTED_COMMAND && (a, q) == vendor::asc::DATA_PHASE_CRC));
            if !again || tries >= COMMAND_RETRIES {
                return Ok(r);
            }
            tries += 1;
        }
    }

    pub(super) async fn send_batch(&self, records: Vec<SendRecord>) -> Result<Vec<Outcome>, Error> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u64> = records.iter().map(|r| r.packet_id).collect();
        let data = Bytes::from(SendList { records }.encode());
        {
            let _shared = self.send_gate.read().await;
            if let Sent::Outcomes(o) = self.send_once(&data, &ids).await? {
                return Ok(o);
            }
        }
        // Repeating the SEND is safe (same ids: stored packets keep their outcome) and,
        // alone on the nexus, its results stay until we read them.
        tracing::debug!("SEND RESULTS replaced by a concurrent SEND; repeating the batch");
        let _exclusive = self.send_gate.write().await;
        match self.send_once(&data, &ids).await? {
            Sent::Outcomes(o) => Ok(o),
            Sent::ResultsLost => Err(Error::Protocol(
                "SEND RESULTS refused the tag of the SEND just made".into(),
            )),
        }
    }

    pub(super) async fn send_once(&self, data: &Bytes, ids: &[u64]) -> Result<Sent, Error> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let param_len = u32::try_from(data.len())
            .map_err(|_| Error::InvalidArgument("SEND list above 4 GiB".into()))?;
        let cdb = SendCdb {
            batch_tag: tag,
            param_len,
        }
        .encode();
        self.sends.fetch_add(1, Ordering::Relaxed);
        self.packets_sent
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        let r = self.run(&cdb, Some(data.clone()), 0).await?;
        match SendStatus::from_reply(r.status, &r.sense_data) {
            Some(SendStatus::All(o)) => Ok(Sent::Outcomes(vec![o; ids.len()])),
            Some(SendStatus::MediaFull) => Err(Error::Busy),
            Some(SendStatus::Mixed) => self.send_results(tag, ids).await,
            None => Err(status_error(&r)),
        }
    }

    pub(super) async fn send_results(&self, tag: u64, ids: &[u64]) -> Result<Sent, Error> {
        let alloc = vendor::RESULTS_HEADER_LEN + vendor::RESULT_ENTRY_LEN * ids.len();
        let cdb = SendResultsCdb {
            batch_tag: tag,
            alloc_len: alloc as u32,
        }
        .encode();
        self.send_results.fetch_add(1, Ordering::Relaxed);
        let r = self.run(&cdb, None, alloc as u32).await?;
        // The target refuses a tag that is not the nexus's last SEND: INVALID FIELD IN CDB.
        if r.status == CHECK_CONDITION
            && matches!(sense_code(&r), Some((key::ILLEGAL_REQUEST, 0x24, 0)))
        {
            return Ok(Sent::ResultsLost);
        }
        check_good(&r)?;
        let res = SendResults::decode(&r.data_in)?;
        if res.batch_tag != tag {
            return Ok(Sent::ResultsLost);
        }
        let same_ids = res.results.len() == ids.len()
            && res
                .results
                .iter()
                .zip(ids)
                .all(|(p, id)| p.packet_id == *id);
        if !same_ids {
            return Err(Error::Protocol(format!(
                "SEND RESULTS for tag {tag}: {} entries that do not match the {} packets sent",
                res.results.len(),
                ids.len()
            )));
        }
        Ok(Sent::Outcomes(
            res.results.into_iter().map(|p| p.outcome).collect(),
        ))
    }
}

impl<T: Transport + 'static> Core<T> {
    /// Sends one caller's packets (at most one SEND's worth) and waits for their
    /// outcomes. With a SEND slot free and nobody waiting, they go at once as a SEND of
    /// their own; otherwise they queue, and a SEND task takes them with the others queued
    /// (starting one when fewer than the maximum run).
    pub(super) async fn submit(
        self: &Arc<Self>,
        records: Vec<SendRecord>,
    ) -> Result<Vec<Outcome>, Error> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No tokio runtime to run SEND tasks on (another executor): send alone, as
            // before coalescing, rather than panic in spawn.
            return self.send_batch(records).await;
        };
        let path = {
            let mut q = self.queue();
            let free = q.tasks < q.max_tasks;
            if free {
                q.tasks += 1;
            }
            if free && q.waiting.is_empty() {
                Path::Alone(records)
            } else {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let len = records.iter().map(SendRecord::encoded_len).sum();
                q.waiting.push_back(Queued {
                    records,
                    len,
                    reply,
                });
                if free {
                    Path::Task(answer)
                } else {
                    Path::Queued(answer)
                }
            }
        };
        match path {
            Path::Alone(records) => {
                // On the caller's own task, not a SEND task: a lone sender pays no hop
                // to another task and back (its latency is the SEND's). Its SEND carries
                // only its packets, so dropping this future loses no one else's answer;
                // the slot hands the queue to a SEND task when it ends, however it ends.
                let _slot = Slot {
                    core: Arc::clone(self),
                };
                return self.send_batch(records).await;
            }
            // No delay and no batching window: callers that come while SENDs are in
            // flight make up the next one.
            Path::Task(answer) => {
                drop(rt.spawn(Arc::clone(self).flush()));
                wait_answer(answer).await
            }
            Path::Queued(answer) => wait_answer(answer).await,
        }
    }

    /// A SEND task: sends what is queued, answers its callers, and goes on until the
    /// queue is empty. Its slot (counted in `tasks` by whoever made it) is guarded from
    /// here on, before the task first runs: a task dropped unpolled gives it back too.
    pub(super) fn flush(self: Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let mut guard = TaskGuard {
            core: Arc::clone(&self),
            done: false,
        };
        async move { self.flush_loop(&mut guard).await }
    }

    pub(super) async fn flush_loop(&self, guard: &mut TaskGuard<T>) {
        loop {
            let batch = {
                let mut q = self.queue();
                let batch = take_batch(&mut q);
                if batch.is_empty() {
                    // Under the lock that a caller queues under: a caller either sees this
                    // task still counted and is taken by it, or sees it gone and starts one.
                    q.tasks -= 1;
                    guard.done = true;
                    return;
                }
                batch
            };
            let mut records = Vec::new();
            let mut replies = Vec::with_capacity(batch.len());
            for q in batch {
                replies.push((q.records.len(), q.reply));
                records.extend(q.records);
            }
            let result = self.send_batch(records).await;
            answer(replies, result);
        }
    }
}

/// How [`Core::submit`] sends a caller's packets.
pub(super) enum Path {
    /// In a SEND of their own, from the caller's task.
    Alone(Vec<SendRecord>),
    /// Queued, with a new SEND task started; the answer comes here.
    Task(Answer),
    /// Queued for a SEND task already running; the answer comes here.
    Queued(Answer),
}

pub(super) type Answer = tokio::sync::oneshot::Receiver<Result<Vec<Outcome>, Error>>;

pub(super) async fn wait_answer(answer: Answer) -> Result<Vec<Outcome>, Error> {
    // The sender is dropped unanswered only if the SEND task died (a panic, or the
    // runtime shutting down) with the packets taken: they may or may not have been sent,
    // which is what a connection error means to the caller (retry with the same ids).
    answer.await.unwrap_or(Err(Error::ConnectionClosed))
}

/// The SEND slot of a caller sending alone ([`Path::Alone`]). When its SEND ends (or the
/// caller goes away), callers that queued meanwhile would wait for a SEND task that may
/// not exist (they queued because the slots were taken): a new one takes over the slot.
pub(super) struct Slot<T: Transport + 'static> {
    pub(super) core: Arc<Core<T>>,
}

impl<T: Transport + 'static> Drop for Slot<T> {
    fn drop(&mut self) {
        {
            let mut q = self.core.queue();
            if q.waiting.is_empty() {
                q.tasks = q.tasks.saturating_sub(1);
                return;
            }
        }
        // The slot stays counted: it is the new task's. Spawned without the queue's lock:
        // a runtime shutting down drops the task at once, and its guard takes the lock.
        let task = Arc::clone(&self.core).flush();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(task)),
            // Dropped outside a runtime: no task can send them. Dropping the task's
            // guard gives the slot back and, if it was the last, fails the waiting
            // callers rather than leave them waiting forever.
            Err(_) => drop(task),
        }
    }
}

/// Keeps the count of SEND tasks right when one ends without emptying the queue (a panic,
/// or the runtime dropping it): the last one to go drops the waiting callers, whose
/// answers then fail (rather than wait forever for a task that is gone).
pub(super) struct TaskGuard<T> {
    pub(super) core: Arc<Core<T>>,
    pub(super) done: bool,
}

impl<T> Drop for TaskGuard<T> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut q = self.core.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.tasks = q.tasks.saturating_sub(1);
        if q.tasks == 0 {
            q.waiting.clear();
        }
    }
}
