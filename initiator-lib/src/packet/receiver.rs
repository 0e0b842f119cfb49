//! The receiving side of a node: [`Receiver`].

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
}

impl<T: Transport> Receiver<T> {
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

    /// Acknowledges everything handed out so far, if not done yet.
    pub async fn ack(&mut self) -> Result<(), Error> {
        if self.handed > self.acked {
            self.client.ack_upto(self.handed).await?;
            self.acked = self.handed;
        }
        Ok(())
    }

    /// One round: acknowledges what was handed out before, waits for records, returns
    /// the new ones (possibly none when the wait ran out or only repeats came).
    pub async fn poll(&mut self) -> Result<Vec<Delivered>, Error> {
        self.ack().await?;
        let got = if self.resync {
            self.catch_up().await
        } else {
            self.client.receive(self.max_records, Some(self.wait)).await
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

    /// The records after the last one handed out, up to the target's RECEIVE position.
    async fn catch_up(&self) -> Result<Vec<Delivered>, Error> {
        let upto = self.client.queue_stats().await?.last_delivered;
        let mut out = Vec::new();
        let mut next = self.handed.saturating_add(1);
        while next <= upto {
            let (page, more) = self.client.replay_page(ReplayFrom::Seq(next)).await?;
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
