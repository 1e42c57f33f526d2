//! Running independent jobs (whole training runs, evaluations) side by side. Small models do
//! not keep two cores busy inside one run: on the 2-core CPU a `search` RL step took 8.3 s per
//! 30 steps with 2 threads and 7.7 s with 1, and two single-threaded runs side by side took
//! 7.0 s each. So every job runs on its own one-thread rayon pool (which also makes its numbers
//! independent of how many jobs run at once), `workers` of them at a time.

use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Rank of an objective's cost per step, cheapest last: the prover's objectives cost several
/// GRPO steps (on `countdown`, single-threaded: mrt-dense ≈ 2.5 s, mrt ≈ 1.4 s, GRPO ≈ 0.6 s a
/// step). Jobs are started costliest first so that the last workers are not left with one long
/// run while the others idle.
pub fn cost_rank(algo: &str) -> u8 {
    match algo {
        "mrt-dense" | "mrt-star" => 0,
        "mrt" => 1,
        _ => 2,
    }
}

/// A job: runs on a worker thread, inside a one-thread rayon pool.
pub type Job<'a, T> = Box<dyn FnOnce() -> Result<T> + Send + 'a>;

/// Runs `jobs` on `workers` threads and returns their results in order. After the first error
/// no new job starts; that error is returned once the running ones have finished.
pub fn run_all<'a, T: Send>(jobs: Vec<Job<'a, T>>, workers: usize) -> Result<Vec<T>> {
    run_when_ready(jobs.into_iter().map(|j| (Vec::new(), j)).collect(), workers)
}

/// Runs jobs that may need others first: each comes with the indices of the jobs that must
/// have finished before it starts. A free worker takes the first job in the list whose
/// prerequisites are done, so the list order is the priority; results come back in that order.
/// After the first error no new job starts (jobs waiting for the failed one never do); that
/// error is returned once the running ones have finished. Prerequisites that can never finish
/// (a cycle, an index out of range) are an error, not a hang.
pub fn run_when_ready<'a, T: Send>(jobs: Vec<(Vec<usize>, Job<'a, T>)>, workers: usize) -> Result<Vec<T>> {
    let n = jobs.len();
    if let Some((i, d)) = jobs
        .iter()
        .enumerate()
        .find_map(|(i, (deps, _))| deps.iter().find(|&&d| d >= n).map(|&d| (i, d)))
    {
        return Err(Error::Budget(format!(
            "job {i} waits for job {d}, which does not exist"
        )));
    }
    struct State<'a, T> {
        pending: Vec<Option<(Vec<usize>, Job<'a, T>)>>,
        results: Vec<Option<T>>,
        running: usize,
        failure: Option<Error>,
    }
    let state = Mutex::new(State {
        pending: jobs.into_iter().map(Some).collect(),
        results: (0..n).map(|_| None).collect(),
        running: 0,
        failure: None,
    });
    let wake = Condvar::new();
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            scope.spawn(|| {
                let pool = match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                    Ok(p) => p,
                    Err(e) => {
                        let mut st = state.lock().expect("not poisoned");
                        st.failure
                            .get_or_insert(Error::io("rayon worker pool", std::io::Error::other(e.to_string())));
                        wake.notify_all();
                        return;
                    }
                };
                let mut st = state.lock().expect("not poisoned");
                loop {
                    if st.failure.is_some() {
                        return;
                    }
                    let ready = (0..n).find(|&i| {
                        st.pending[i]
                            .as_ref()
                            .is_some_and(|(deps, _)| deps.iter().all(|&d| st.results[d].is_some()))
                    });
                    let Some(i) = ready else {
                        if st.pending.iter().all(Option::is_none) {
                            return;
                        }
                        if st.running == 0 {
                            st.failure = Some(Error::Budget("jobs wait for each other in a cycle".into()));
                            wake.notify_all();
                            return;
                        }
                        st = wake.wait(st).expect("not poisoned");
                        continue;
                    };
                    let (_, job) = st.pending[i].take().expect("found pending");
                    st.running += 1;
                    drop(st);
                    let outcome = pool.install(job);
                    st = state.lock().expect("not poisoned");
                    st.running -= 1;
                    match outcome {
                        Ok(v) => st.results[i] = Some(v),
                        Err(e) => {
                            st.failure.get_or_insert(e);
                        }
                    }
                    wake.notify_all();
                }
            });
        }
    });
    let st = state.into_inner().expect("not poisoned");
    if let Some(e) = st.failure {
        return Err(e);
    }
    Ok(st.results.into_iter().map(|r| r.expect("every job ran")).collect())
}

/// Runs `jobs` like [`run_all`], starting them in descending order of their `cost` estimates
/// (ties keep their order) and returning results in the order given. Longest first keeps the
/// longest job off the end: warm starts of `--regime all` listed by regime put countdown's
/// (three times a search one) last, so one worker trained it alone for ~7 minutes while the
/// other idled before the RL runs could begin (measured, 2-core CPU).
pub fn run_costliest_first<'a, T: Send>(jobs: Vec<(u64, Job<'a, T>)>, workers: usize) -> Result<Vec<T>> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].0));
    let mut slots: Vec<Option<Job<'a, T>>> = jobs.into_iter().map(|(_, j)| Some(j)).collect();
    let sorted = order.iter().map(|&i| slots[i].take().expect("each job once")).collect();
    let mut results: Vec<Option<T>> = (0..order.len()).map(|_| None).collect();
    for (i, r) in order.into_iter().zip(run_all(sorted, workers)?) {
        results[i] = Some(r);
    }
    Ok(results.into_iter().map(|r| r.expect("every job ran")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_and_each_job_has_one_thread() {
        let jobs: Vec<Job<(usize, usize)>> = (0..7usize)
            .map(|i| Box::new(move || Ok((i, rayon::current_num_threads()))) as Job<(usize, usize)>)
            .collect();
        let out = run_all(jobs, 3).unwrap();
        assert_eq!(out, (0..7).map(|i| (i, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn the_first_error_is_returned() {
        let jobs: Vec<Job<usize>> = vec![
            Box::new(|| Ok(1)),
            Box::new(|| Err(Error::Budget("boom".into()))),
            Box::new(|| Ok(3)),
        ];
        let err = run_all(jobs, 1).unwrap_err().to_string();
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn costliest_jobs_start_first_and_results_keep_the_given_order() {
        let started = Mutex::new(Vec::new());
        let costs = [5u64, 30, 5, 12];
        let jobs: Vec<(u64, Job<usize>)> = costs
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let started = &started;
                (
                    c,
                    Box::new(move || {
                        started.lock().unwrap().push(i);
                        Ok(i * 10)
                    }) as Job<usize>,
                )
            })
            .collect();
        let out = run_costliest_first(jobs, 1).unwrap();
        assert_eq!(out, vec![0, 10, 20, 30]);
        assert_eq!(*started.lock().unwrap(), vec![1, 3, 0, 2]);
    }

    /// A job starts only after its prerequisites finish, and among ready jobs the first listed
    /// goes first; results keep the list order.
    #[test]
    fn jobs_wait_for_their_prerequisites() {
        let log = Mutex::new(Vec::new());
        let job = |i: usize| {
            let log = &log;
            Box::new(move || {
                log.lock().unwrap().push(i);
                Ok(i)
            }) as Job<usize>
        };
        // 0 needs 2, 1 needs 0, 2 needs nothing, 3 needs 2: one worker runs 2, 0, 1, 3.
        let jobs = vec![
            (vec![2], job(0)),
            (vec![0], job(1)),
            (vec![], job(2)),
            (vec![2], job(3)),
        ];
        assert_eq!(run_when_ready(jobs, 1).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(*log.lock().unwrap(), vec![2, 0, 1, 3]);
        // With two workers too, nothing starts before what it needs.
        log.lock().unwrap().clear();
        let jobs = vec![
            (vec![2], job(0)),
            (vec![0], job(1)),
            (vec![], job(2)),
            (vec![2], job(3)),
        ];
        run_when_ready(jobs, 2).unwrap();
        let order = log.lock().unwrap().clone();
        let at = |i: usize| order.iter().position(|&j| j == i).unwrap();
        assert!(at(2) < at(0) && at(0) < at(1) && at(2) < at(3), "{order:?}");
    }

    #[test]
    fn a_failed_prerequisite_stops_what_waits_for_it_and_cycles_are_errors() {
        let ran = Mutex::new(Vec::new());
        let jobs: Vec<(Vec<usize>, Job<usize>)> = vec![
            (vec![], Box::new(|| Err(Error::Budget("warm start failed".into())))),
            (
                vec![0],
                Box::new(|| {
                    ran.lock().unwrap().push(1);
                    Ok(1)
                }),
            ),
        ];
        let err = run_when_ready(jobs, 2).unwrap_err().to_string();
        assert!(
            err.contains("warm start failed") && ran.lock().unwrap().is_empty(),
            "{err}"
        );
        let cycle: Vec<(Vec<usize>, Job<usize>)> = vec![(vec![1], Box::new(|| Ok(0))), (vec![0], Box::new(|| Ok(1)))];
        assert!(run_when_ready(cycle, 2).unwrap_err().to_string().contains("cycle"));
        let missing: Vec<(Vec<usize>, Job<usize>)> = vec![(vec![5], Box::new(|| Ok(0)))];
        assert!(run_when_ready(missing, 1)
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }

    #[test]
    fn costlier_objectives_rank_first() {
        assert!(cost_rank("mrt-dense") < cost_rank("mrt") && cost_rank("mrt") < cost_rank("grpo"));
        assert_eq!(cost_rank("star"), cost_rank("grpo"));
    }
}
