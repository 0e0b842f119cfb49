//! The receiving side of a node: [`Receiver`].

use std::pin::Pin;

use super::*;

/// Long-polls a [`PacketClient`] and hands each record to the application once.
///
/// The target keeps records until they are acknowledged and a new nexus starts at the
/// first unacknowledged one, so after a reconnect records come again. The receiver
/// remembers the highest sequence number it handed out and drops anything at or below
/// it. It acknowledges records when the application asks for the next batch (or calls
/// [`Receiver::ack`]), i.e. after the application has taken them: a crash of the
/// application in between gets them again from the target (at least once across crashes,
/// exactly once within the process; persist [`Receiver::last_seq`] and resume with
/// [`Receiver::starting_after`] to stretch that across restarts).
///
/// After a connection error the receive position on the target may have moved past a
/// response that never arrived (a timed-out RECEIVE can still complete), so the next poll
/// first reads the records up to the target's position again with REPLAY.
///
/// The ACK of one batch goes out beside the next RECEIVE, not before it: the target makes
/// an ACK durable before answering it, and a record arriving meanwhile would otherwise
/// wait for that commit as well as its own.
pub struct Receiver<T> {
    client: Arc<PacketClient<T>>,
    wait: Duration,
    max_records: u32,
    /// Highest sequence number handed to the application.
    handed: u64,
    /// Highest sequence number the target has (as far as we know) acknowledged.
    acked: u64,
    /// The last receive failed: catch up with REPLAY before the next RECEIVE.
    resync: bool,
    /// The ACK on its way, with the sequence number it acknowledges up to.
    ack_flying: Option<(u64, AckFuture)>,
    /// An ACK refused for a reason other than the connection (which the RECEIVE beside it
    /// reports too): the next poll returns it.
    ack_failed: Option<Error>,
}

/// An ACK command in flight, kept across polls.
type AckFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

impl<T: Transport + 'static> Receiver<T> {
    /// A receiver on `client` that waits up to the client's maximum per poll.
    #[must_use]
    pub fn new(client: Arc<PacketClient<T>>) -> Self {
        Receiver {
            wait: client.max_wait,
            client,
            max_records: 0,
            handed: 0,
            acked: 0,
            resync: false,
            ack_flying: None,
            ack_failed: None,
        }
    }

    /// Waits up to `wait` per poll (the client caps it).
    #[must_use]
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Takes at most `n` records per poll (0 = as many as fit).
    #[must_use]
    pub fn with_max_records(mut self, n: u32) -> Self {
        self.max_records = n;
        self
    }

    /// Treats every record up to `seq` as already handed to the application (and
    /// acknowledges up to it on the first poll): resume where a previous run stopped.
    #[must_use]
    pub fn starting_after(mut self, seq: u64) -> Self {
        self.handed = seq;
        self
    }

    /// The client, e.g. to [`PacketClient::replace_transport`] after a reconnect.
    #[must_use]
    pub fn client(&self) -> &Arc<PacketClient<T>> {
        &self.client
    }

    /// Highest sequence number handed to the application (0 = none yet).
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.handed
    }

    /// Acknowledges everything handed out so far, if not done yet, and waits for it.
    pub async fn ack(&mut self) -> Result<(), Error> {
        if let Some(e) = self.ack_failed.take() {
            return Err(e);
        }
        if let Some((upto, f)) = self.ack_flying.take() {
            f.await?;
            self.acked = self.acked.max(upto);
        }
        if self.handed > self.acked {
            self.client.ack_upto(self.handed).await?;
            self.acked = self.handed;
        }
        Ok(())
    }

    /// One round: acknowledges what was handed out before (the ACK travels beside this
    /// round's RECEIVE and may still be on its way when the round ends), waits for
    /// records, returns the new ones (possibly none when the wait ran out or only repeats
    /// came).
    pub async fn poll(&mut self) -> Result<Vec<Delivered>, Error> {
        if let Some(e) = self.ack_failed.take() {
            return Err(e);
        }
        let client = Arc::clone(&self.client);
        let (resync, handed, max_records, wait) =
            (self.resync, self.handed, self.max_records, self.wait);
        let receive = async move {
            if resync {
                catch_up(&client, handed).await
            } else {
                client.receive(max_records, Some(wait)).await
            }
        };
        tokio::pin!(receive);
        // The connection failed under an ACK: the RECEIVE reports it; no new ACK now.
        let mut ack_broke = false;
        let got = loop {
            // One ACK at a time; when one ends while the RECEIVE still waits, the next
            // covers what was handed out since, so a quiet spell leaves nothing unacked.
            if self.ack_flying.is_none()
                && self.ack_failed.is_none()
                && !ack_broke
                && self.handed > self.acked
            {
                let (client, upto) = (Arc::clone(&self.client), self.handed);
                let f: AckFuture = Box::pin(async move { client.ack_upto(upto).await });
                self.ack_flying = Some((upto, f));
            }
            let Some((upto, ack)) = self.ack_flying.as_mut() else {
                break receive.await;
            };
            let upto = *upto;
            // Biased: the ACK is sent first, so the target sees the two in that order.
            tokio::select! {
                biased;
                r = ack => {
                    self.ack_flying = None;
                    match r {
                        Ok(()) => self.acked = self.acked.max(upto),
                        // The RECEIVE beside it fails too, or the next poll acks again.
                        Err(e) if e.is_connection_error() => ack_broke = true,
                        Err(e) => self.ack_failed = Some(e),
                    }
                }
                r = &mut receive => break r,
            }
        };
        match got {
            Ok(records) => {
                self.resync = false;
                Ok(self.take_new(records))
            }
            Err(e) => {
                if e.is_connection_error() {
                    self.resync = true;
                }
                Err(e)
            }
        }
    }

    /// Polls until at least one new record comes.
    pub async fn next(&mut self) -> Result<Vec<Delivered>, Error> {
        loop {
            let r = self.poll().await?;
            if !r.is_empty() {
                return Ok(r);
            }
        }
    }

    /// Drops records already handed out and remembers the rest.
    fn take_new(&mut self, records: Vec<Delivered>) -> Vec<Delivered> {
        let mut fresh = Vec::with_capacity(records.len());
        for d in records {
            if d.seq <= self.handed {
                // Sent again: the target did not get (or keep) our ACK for it.
                self.acked = self.acked.min(d.seq.saturating_sub(1));
                continue;
            }
            self.handed = d.seq;
            fresh.push(d);
        }
        fresh
    }
}

/// The records after `handed`, up to the target's RECEIVE position.
async fn catch_up<T: Transport>(
    client: &PacketClient<T>,
    handed: u64,
) -> Result<Vec<Delivered>, Error> {
    let upto = client.queue_stats().await?.last_delivered;
    let mut out = Vec::new();
    let mut next = handed.saturating_add(1);
    while next <= upto {
        let (page, more) = client.replay_page(ReplayFrom::Seq(next)).await?;
        let Some(last) = page.last().map(|d| d.seq) else {
            break;
        };
        out.extend(page.into_iter().filter(|d| d.seq <= upto));
        if !more {
            break;
        }
        next = last.saturating_add(1);
    }
    Ok(out)
}
