//! A replica's write path, pipelined: the next group is decided while this one is appended.
//!
//! Each upstream append costs a round trip (a quorum's fsyncs for JetStream at R3), and a
//! replica decided, appended, copied and folded one group at a time, so its deciding and the
//! round trip never overlapped. The leader of a group now keeps the lead for a *streak* of up
//! to [`MAX_STREAK`] groups while requests keep coming:
//!
//! 1. it decides group *k + 1* on the projections plus the [`Overlay`] of group *k* (as the
//!    sled path decides on the batch in flight), while *k*'s append is in flight upstream:
//!    what is queued when *k* is sent, or else what arrives while it is in flight;
//! 2. it awaits *k*'s append. When every command of *k* landed exactly where it was decided
//!    (each `Appended` at the positions folded into its overlay), it sends *k + 1* at once, its
//!    first command expecting the head *k* left; then it copies *k*'s entries into the replica
//!    and hands *k*'s sealed projection batch to the committer thread, instead of folding the
//!    copy again. *k*'s callers are answered once that batch is written.
//!
//! So a group is appended only after the group it was decided on landed as decided:
//! `Expected::Head` checks a position, not the entries before it, and a group decided on a
//! group that was refused must never be appended after someone else's entries of the same
//! length.
//!
//! When a group does not land as decided (another writer moved the head, a retry found its
//! first attempt, the upstream failed), its sealed batch and the next group's decisions are
//! dropped and every command without a final answer goes through the round-by-round path
//! ([`Engine::execute_replicated`]), which pulls and decides again on the new head; the streak
//! ends there. A command whose fold reads its own forms back from the log (an edit, an
//! archive) ends its group and is folded from the copy once it lands; the group after it is
//! decided only then.
//!
//! While a streak runs, `Writer::leading` keeps every other fold of the copy away (a pull
//! copies but does not fold, the follower leaves new entries to the streak): the copy holds
//! the streak's entries before their batches are written, and folding them from the copy too
//! would apply them twice. The streak ends with a pull when the follower saw entries beyond
//! the copy meanwhile (other writers').

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use domain::{Position, RecordedEvent};
use eventlog::{AppendOutcome, AppendRequest, LogError};
use projections::{Overlay, Sealed};

use crate::combine::{answer_all, answer_failed, Answer};
use crate::committer::Inflight;
use crate::replica::{Fate, Upstream};
use crate::{blocking, Engine, EngineError, Outcome, Outcomes, Request};

/// Groups one leader decides and appends back to back before it hands the lead on. Its own
/// caller is answered with the first group but returns only when the streak ends.
const MAX_STREAK: usize = 8;

/// How long a landed group's entries may take to be readable upstream (a direct get served
/// by a replica that has not applied them yet) before the streak gives up on copying them.
const COPY_WAIT: Duration = Duration::from_secs(10);

/// An append in flight upstream.
type Appending<'a> =
    Pin<Box<dyn Future<Output = Vec<Result<AppendOutcome, LogError>>> + Send + 'a>>;

/// What the next group is decided on.
#[derive(Clone)]
enum Base {
    /// The projections, plus the overlay of the group before when it is still landing.
    Over(Option<Arc<Overlay>>),
    /// Nothing yet: the group before folds from the copy once it lands (an edit or archive),
    /// or a group failed to be decided; decide again once nothing is in flight.
    AfterFold,
}

/// A group as [`Engine::decide_group`] leaves it.
struct Decision {
    /// Per request: its answer when it needs no append, `SameAs` a repeated key, else `None`.
    fates: Vec<Option<Fate>>,
    /// The decided appends' slots, with their events as decided and folded.
    appends: Vec<(usize, Vec<RecordedEvent>)>,
    /// The decided appends themselves, in order; taken when the group is sent.
    outgoing: Vec<AppendRequest>,
    /// Requests decided; the rest come after an edit or archive and go to the next group.
    decided: usize,
    /// The group's projection batch and the overlay the next group reads through.
    sealed: Option<(Sealed, Arc<Overlay>)>,
    /// What the group after this one is decided on.
    next: Base,
}

/// A leader's streak: what waits to be decided, on what, and how many groups it decided.
struct Streak {
    queued: Vec<(Request, Answer)>,
    base: Base,
    groups: usize,
}

/// A decided group and its callers.
struct Group {
    requests: Vec<Request>,
    answers: Vec<Answer>,
    decision: Decision,
}

/// Clears `Writer::leading` when the streak ends, however it ends (a dropped leader too).
struct Leading<'a>(&'a Engine);

impl<'a> Leading<'a> {
    fn start(engine: &'a Engine) -> Self {
        engine.lock().leading = true;
        Leading(engine)
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.lock().leading = false;
    }
}

impl Engine {
    /// Leads a streak of groups, starting with `first` (see the module docs). Every request
    /// taken is answered on its own channel.
    pub(crate) async fn lead_replicated(&self, up: &Upstream, first: Vec<(Request, Answer)>) {
        let leading = Leading::start(self);
        let mut streak = Streak {
            queued: first,
            base: Base::Over(None),
            groups: 0,
        };
        let mut flying: Option<(Group, Appending<'_>)> = None;
        loop {
            if streak.queued.is_empty() && streak.groups < MAX_STREAK {
                streak.queued = self.combiner.take();
            }
            // Decide the next group on what the flying one leaves, while it is in flight.
            let mut next = self.decide_next(up, &mut streak, flying.is_some());
            if let Some((group, mut append)) = flying.take() {
                // Requests that arrive while the group is in flight are decided meanwhile.
                let results = loop {
                    if next.is_some()
                        || !matches!(streak.base, Base::Over(_))
                        || streak.groups >= MAX_STREAK
                    {
                        break append.await;
                    }
                    tokio::select! {
                        biased;
                        results = &mut append => break results,
                        () = self.combiner.arrived.notified() => {
                            streak.queued = self.combiner.take();
                            next = self.decide_next(up, &mut streak, true);
                        }
                    }
                };
                let landed = match classify(up, group, results) {
                    Ok(landed) => landed,
                    Err(mut rest) => {
                        // Not as decided: everything without a final answer goes round by
                        // round, after a pull, on the new head.
                        if let Some(next) = next.take() {
                            rest.push_undecided(next.requests, next.answers);
                        }
                        return self.fall_back(up, leading, rest, streak.queued).await;
                    }
                };
                // Landed as decided: the next group goes on its way before this one is copied.
                if let Some(group) = next.take() {
                    flying = Some(launch(up, &mut streak, group).await);
                }
                if let Err(mut rest) = self.finish_landed(landed).await {
                    if let Some((group, append)) = flying.take() {
                        let results = append.await;
                        match classify(up, group, results) {
                            Ok(landed) => rest.push_landed(landed),
                            Err(more) => rest.push_rest(more),
                        }
                    }
                    return self.fall_back(up, leading, rest, streak.queued).await;
                }
            } else if let Some(group) = next.take() {
                flying = Some(launch(up, &mut streak, group).await);
            }
            if flying.is_none() && matches!(streak.base, Base::AfterFold) {
                // Nothing of the streak is in flight: decide on the projections again.
                streak.base = Base::Over(None);
            }
            if flying.is_none() && streak.queued.is_empty() {
                break;
            }
        }
        drop(leading);
        // Copy and fold what other writers appended meanwhile, which the follower left to the
        // streak (`leading` is cleared before `seen` is read, the follower sets them the other
        // way round: one of the two pulls). The streak's own batches are written.
        let seen = up.seen.load(std::sync::atomic::Ordering::SeqCst);
        if seen > self.log.written_head().0 {
            if let Err(e) = self.pull().await {
                tracing::warn!(error = %e, "replica: pull after a streak failed");
            }
        }
    }

    /// Decides the queued requests as the next group, on `streak.base`, unless there are none
    /// or the base is not known yet. A group that fails to be decided is answered with its
    /// error; the next one is then decided only once nothing of the streak is in flight.
    fn decide_next(&self, up: &Upstream, streak: &mut Streak, flying: bool) -> Option<Group> {
        let Base::Over(over) = &streak.base else {
            return None;
        };
        if streak.queued.is_empty() {
            return None;
        }
        streak.groups += 1;
        if flying {
            up.overlapped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let (requests, answers): (Vec<_>, Vec<_>) =
            std::mem::take(&mut streak.queued).into_iter().unzip();
        match blocking(|| self.decide_group(&requests, over.clone())) {
            Ok(decision) => {
                let (requests, answers) =
                    carry_rest(requests, answers, decision.decided, &mut streak.queued);
                Some(Group {
                    requests,
                    answers,
                    decision,
                })
            }
            Err(e) => {
                answer_failed(answers, &e);
                streak.base = Base::AfterFold;
                None
            }
        }
    }

    /// Ends a streak whose group did not land as decided: `rest` and everything queued go
    /// through the round-by-round path, which pulls and decides again on the new head.
    async fn fall_back(
        &self,
        up: &Upstream,
        leading: Leading<'_>,
        mut rest: Rest,
        queued: Vec<(Request, Answer)>,
    ) {
        let (requests, answers): (Vec<_>, Vec<_>) = queued.into_iter().unzip();
        rest.push_undecided(requests, answers);
        drop(leading);
        match self
            .execute_rounds(up, &rest.requests, rest.fates, true)
            .await
        {
            Ok(outcomes) => answer_all(rest.answers, outcomes, Ok(())),
            Err(e) => answer_failed(rest.answers, &e),
        }
    }

    /// Decides `requests` in order, on the projections plus `over` (the group before, still
    /// landing), or on the projections caught up with the copy when `over` is `None`. Stops
    /// after a command whose fold reads its forms back from the log.
    fn decide_group(
        &self,
        requests: &[Request],
        over: Option<Arc<Overlay>>,
    ) -> Result<Decision, EngineError> {
        let mut clock = self.lock();
        // The batch of the group before `over`'s is written first: `over` holds only its own
        // group's changes.
        if !Self::settle(&mut clock) {
            return Err(EngineError::Internal(
                "a projection batch of this streak was not written; the next group catches up \
                 from the log"
                    .into(),
            ));
        }
        if over.is_none() {
            self.catch_up()?;
        }
        let mut pending = self.projections.pending_over(over.clone(), None);
        let start = pending.checkpoint();
        let mut fates: Vec<Option<Fate>> = requests.iter().map(|_| None).collect();
        let (appends, rebuilt) = self.decide_in_order(
            &mut clock,
            &mut pending,
            requests,
            0..requests.len(),
            &mut fates,
        )?;
        let decided = match appends.last() {
            Some((slot, _, _)) if rebuilt => slot + 1,
            _ => requests.len(),
        };
        let (sealed, next) = if rebuilt {
            (None, Base::AfterFold)
        } else if pending.checkpoint() == start {
            (None, Base::Over(over))
        } else {
            let (sealed, overlay) = pending.seal()?;
            let overlay = Arc::new(overlay);
            (
                Some((sealed, Arc::clone(&overlay))),
                Base::Over(Some(overlay)),
            )
        };
        fates.truncate(decided);
        let (appends, outgoing) = appends
            .into_iter()
            .map(|(slot, append, recorded)| ((slot, recorded), append))
            .unzip();
        Ok(Decision {
            fates,
            appends,
            outgoing,
            decided,
            sealed,
            next,
        })
    }

    /// Finishes a group that landed as decided: copies its entries, hands its batch to the
    /// committer (or folds the copy after an edit or archive) and answers its callers once the
    /// batch is written. Hands the group back when its entries cannot be copied.
    async fn finish_landed(&self, landed: Landed) -> Result<(), Rest> {
        let Landed {
            requests,
            answers,
            fates,
            recorded,
            last,
            sealed,
            next,
        } = landed;
        let copied = match last {
            Some(last) => self.copy_through(last).await,
            None => Ok(()),
        };
        // The batch it was decided on top of was written, or this one must not be either.
        let settled =
            copied.is_ok() && (sealed.is_none() || blocking(|| Self::settle(&mut self.lock())));
        if !settled {
            if let Err(e) = copied {
                tracing::warn!(error = %e, "replica: landed entries not copied yet");
            }
            return Err(Rest {
                requests,
                answers,
                fates,
            });
        }
        let outcomes = self.outcomes(fates, recorded);
        match (sealed, next) {
            (Some((sealed, overlay)), _) => {
                let done = self.committer.submit(sealed);
                self.lock().inflight = Some(Inflight {
                    overlay,
                    done: Arc::clone(&done),
                });
                tokio::spawn(async move {
                    let written = done.done().await.map_err(|e| {
                        EngineError::Internal(format!(
                            "projection write failed ({e}); the log holds the events and the \
                             next command catches the projections up"
                        ))
                    });
                    answer_all(answers, outcomes, written);
                });
            }
            (None, Base::AfterFold) => {
                let folded = blocking(|| -> Result<(), EngineError> {
                    let mut writer = self.lock();
                    Self::settle(&mut writer);
                    self.catch_up()
                });
                answer_all(answers, outcomes, folded);
            }
            (None, Base::Over(_)) => answer_all(answers, outcomes, Ok(())),
        }
        Ok(())
    }

    /// The answers of a group that landed as decided: its events as recorded for a command
    /// appended now, the log's for a retry found there, and a repeated key's earlier answer.
    fn outcomes(
        &self,
        fates: Vec<Option<Fate>>,
        mut recorded: Vec<Option<Vec<RecordedEvent>>>,
    ) -> Outcomes {
        let mut out: Outcomes = Vec::with_capacity(fates.len());
        let mut same = Vec::new();
        for (slot, fate) in fates.into_iter().enumerate() {
            out.push(match fate {
                Some(Fate::At(first, last)) => {
                    match recorded.get_mut(slot).and_then(Option::take) {
                        Some(events) => Ok(Outcome { events }),
                        None => self.events_between(first, last),
                    }
                }
                Some(Fate::Answered(result)) => result,
                Some(Fate::SameAs(earlier)) => {
                    same.push((slot, earlier));
                    Ok(Outcome { events: Vec::new() })
                }
                None => Err(EngineError::Internal(
                    "a command of the group has no outcome".into(),
                )),
            });
        }
        for (slot, earlier) in same {
            out[slot] = match out.get(earlier) {
                Some(Ok(outcome)) => Ok(outcome.clone()),
                _ => Err(EngineError::Internal(
                    "the command this one repeats did not succeed".into(),
                )),
            };
        }
        out
    }

    /// Copies the upstream into the replica until it holds `last`, waiting for a direct get
    /// that lags the append it answers.
    async fn copy_through(&self, last: Position) -> Result<(), EngineError> {
        // Its own appends, as this process sent them: nothing to read back.
        match self.copy_recent(last).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "replica: own appends not copied; reading them back")
            }
        }
        let deadline = tokio::time::Instant::now() + COPY_WAIT;
        loop {
            // The follower may have copied it already.
            if self.log.written_head() >= last || self.copy().await? >= last {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::Log(LogError::Unavailable(format!(
                    "position {last} was acknowledged but could not be read back within {COPY_WAIT:?}"
                ))));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// What a group that did not land as decided leaves to the round-by-round path.
struct Rest {
    requests: Vec<Request>,
    answers: Vec<Answer>,
    fates: Vec<Option<Fate>>,
}

impl Rest {
    fn push_undecided(&mut self, requests: Vec<Request>, answers: Vec<Answer>) {
        self.fates.extend(requests.iter().map(|_| None));
        self.requests.extend(requests);
        self.answers.extend(answers);
    }

    /// Appends another group's rest; its `SameAs` slots are renumbered.
    fn push_rest(&mut self, other: Rest) {
        let offset = self.requests.len();
        self.fates.extend(other.fates.into_iter().map(|f| match f {
            Some(Fate::SameAs(earlier)) => Some(Fate::SameAs(earlier + offset)),
            other => other,
        }));
        self.requests.extend(other.requests);
        self.answers.extend(other.answers);
    }

    /// A group that landed as decided but will not be finished here: what landed stays
    /// landed (answered from the log once copied), its batch is dropped.
    fn push_landed(&mut self, landed: Landed) {
        self.push_rest(Rest {
            requests: landed.requests,
            answers: landed.answers,
            fates: landed.fates,
        });
    }
}

/// A group that landed as decided, before it is copied and projected.
struct Landed {
    requests: Vec<Request>,
    answers: Vec<Answer>,
    fates: Vec<Option<Fate>>,
    /// Per slot, the events of a command appended now, as decided and folded.
    recorded: Vec<Option<Vec<RecordedEvent>>>,
    /// The last position the group appended.
    last: Option<Position>,
    sealed: Option<(Sealed, Arc<Overlay>)>,
    next: Base,
}

/// Files each append's answer in its command's fate: `Ok` when every append landed where it
/// was decided; otherwise the group's rest to decide again. Answers decided after the first
/// append that did not land as decided assumed it did, so they are decided again too;
/// appends that landed stay landed.
fn classify(
    up: &Upstream,
    group: Group,
    results: Vec<Result<AppendOutcome, LogError>>,
) -> Result<Landed, Rest> {
    let Group {
        requests,
        answers,
        decision,
    } = group;
    let Decision {
        mut fates,
        appends,
        sealed,
        next,
        ..
    } = decision;
    let mut first_off: Option<usize> = None;
    let mut last = None;
    let mut recorded_of: Vec<Option<Vec<RecordedEvent>>> = requests.iter().map(|_| None).collect();
    let mut results = results.into_iter();
    for (slot, recorded) in appends {
        let decided = (
            recorded.first().map(|e| e.position),
            recorded.last().map(|e| e.position),
        );
        let result = results.next().unwrap_or_else(|| {
            Err(LogError::Unavailable(
                "the store answered fewer appends than asked".into(),
            ))
        });
        fates[slot] = match result {
            Ok(AppendOutcome::Appended { first, last: end })
                if decided == (Some(first), Some(end)) =>
            {
                last = Some(end);
                recorded_of[slot] = Some(recorded);
                Some(Fate::At(first, end))
            }
            Ok(AppendOutcome::Appended { first, last: end })
            | Ok(AppendOutcome::AlreadyAppended { first, last: end }) => {
                first_off.get_or_insert(slot);
                Some(Fate::At(first, end))
            }
            Err(LogError::WrongExpectedPosition { .. }) => {
                up.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                first_off.get_or_insert(slot);
                None
            }
            Err(e) => {
                first_off.get_or_insert(slot);
                Some(Fate::Answered(Err(e.into())))
            }
        };
    }
    if let Some(off) = first_off {
        for fate in fates.iter_mut().skip(off + 1) {
            if matches!(fate, Some(Fate::Answered(_) | Fate::SameAs(_))) {
                *fate = None;
            }
        }
        return Err(Rest {
            requests,
            answers,
            fates,
        });
    }
    Ok(Landed {
        requests,
        answers,
        fates,
        recorded: recorded_of,
        last,
        sealed,
        next,
    })
}

/// Sends a decided group upstream (its appends moved out, not copied); the next group is
/// decided on what it leaves.
async fn launch<'u>(
    up: &'u Upstream,
    streak: &mut Streak,
    mut group: Group,
) -> (Group, Appending<'u>) {
    streak.base = group.decision.next.clone();
    let appends = std::mem::take(&mut group.decision.outgoing);
    let append = send(up, appends).await;
    (group, append)
}

/// Sends `appends` upstream and polls once, so that a store that queues on the first poll
/// (JetStream) has them on their way while the leader goes on.
async fn send(up: &Upstream, appends: Vec<AppendRequest>) -> Appending<'_> {
    let mut append = if appends.is_empty() {
        Box::pin(std::future::ready(Vec::new())) as Appending<'_>
    } else {
        up.store.append_all(appends)
    };
    let polled = std::future::poll_fn(|cx| Poll::Ready(append.as_mut().poll(cx))).await;
    if let Poll::Ready(results) = polled {
        append = Box::pin(std::future::ready(results));
    }
    append
}

/// Splits off the requests after the first `decided` and puts them first in `queued`.
fn carry_rest(
    mut requests: Vec<Request>,
    mut answers: Vec<Answer>,
    decided: usize,
    queued: &mut Vec<(Request, Answer)>,
) -> (Vec<Request>, Vec<Answer>) {
    let rest: Vec<(Request, Answer)> = requests
        .split_off(decided)
        .into_iter()
        .zip(answers.split_off(decided))
        .collect();
    let later = std::mem::replace(queued, rest);
    queued.extend(later);
    (requests, answers)
}
