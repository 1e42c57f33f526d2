//! Running independent jobs (whole training runs, evaluations) side by side. Small models do
//! not keep two cores busy inside one run: on the 2-core CPU a `search` RL step took 8.3 s per
//! 30 steps with 2 threads and 7.7 s with 1, and two single-threaded runs side by side took
//! 7.0 s each. So every job runs on its own one-thread rayon pool (which also makes its numbers
//! independent of how many jobs run at once), `workers` of them at a time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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
    let n = jobs.len();
    let queue: Mutex<VecDeque<(usize, Job<'a, T>)>> = Mutex::new(jobs.into_iter().enumerate().collect());
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            scope.spawn(|| {
                let pool = match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                    Ok(p) => p,
                    Err(e) => {
                        failed.store(true, Ordering::SeqCst);
                        *failure.lock().expect("not poisoned") = Some(Error::io("rayon worker pool", std::io::Error::other(e.to_string())));
                        return;
                    }
                };
                loop {
                    if failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some((i, job)) = queue.lock().expect("not poisoned").pop_front() else { return };
                    match pool.install(job) {
                        Ok(v) => results.lock().expect("not poisoned")[i] = Some(v),
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            failure.lock().expect("not poisoned").get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("not poisoned") {
        return Err(e);
    }
    Ok(results.into_inner().expect("not poisoned").into_iter().map(|r| r.expect("every job ran")).collect())
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
        let jobs: Vec<Job<(usize, usize)>> = (0..7usize).map(|i| Box::new(move || Ok((i, rayon::current_num_threads()))) as Job<(usize, usize)>).collect();
        let out = run_all(jobs, 3).unwrap();
        assert_eq!(out, (0..7).map(|i| (i, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn the_first_error_is_returned() {
        let jobs: Vec<Job<usize>> = vec![Box::new(|| Ok(1)), Box::new(|| Err(Error::Budget("boom".into()))), Box::new(|| Ok(3))];
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
                (c, Box::new(move || {
                    started.lock().unwrap().push(i);
                    Ok(i * 10)
                }) as Job<usize>)
            })
            .collect();
        let out = run_costliest_first(jobs, 1).unwrap();
        assert_eq!(out, vec![0, 10, 20, 30]);
        assert_eq!(*started.lock().unwrap(), vec![1, 3, 0, 2]);
    }

    #[test]
    fn costlier_objectives_rank_first() {
        assert!(cost_rank("mrt-dense") < cost_rank("mrt") && cost_rank("mrt") < cost_rank("grpo"));
        assert_eq!(cost_rank("star"), cost_rank("grpo"));
    }
}
