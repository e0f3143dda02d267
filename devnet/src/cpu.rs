//! CPU time per process, from `/proc`: what the demo and the bench divide by the bytes of
//! a job to give CPU nanoseconds per file byte for every process of the devnet.
//!
//! Running processes (KMEs, site agents) are read from `/proc/<pid>/stat` (`utime` +
//! `stime`) before and after a job. The backup client is a child that has exited by the
//! time its job is done: its time is the growth of this process's `cutime` + `cstime`
//! (children waited for), read from `/proc/self/stat` around the run.

use std::time::Duration;

use crate::DevnetInfo;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`: 100 on Linux for x86 and
/// arm64; the kernel reports these fields in this fixed unit whatever its internal HZ).
const USER_HZ: f64 = 100.0;

/// Fields 14..=17 of `/proc/<pid>/stat` (utime, stime, cutime, cstime), in ticks.
fn stat_times(pid: &str) -> Option<[u64; 4]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is f[N - 3].
    let get = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some([get(14)?, get(15)?, get(16)?, get(17)?])
}

fn ticks(t: u64) -> Duration {
    Duration::from_secs_f64(t as f64 / USER_HZ)
}

/// CPU time (user + system) a running process has used so far.
pub fn process(pid: u32) -> Option<Duration> {
    stat_times(&pid.to_string()).map(|t| ticks(t[0] + t[1]))
}

/// CPU time (user + system) of this process's children that have exited and been waited
/// for.
pub fn exited_children() -> Duration {
    stat_times("self").map_or(Duration::ZERO, |t| ticks(t[2] + t[3]))
}

/// One process of the devnet: its label (`KME A`, `agent B`) and site.
#[derive(Debug, Clone)]
pub struct Proc {
    pub label: String,
    pub site: String,
    pub pid: u32,
}

/// Every KME, site agent and (with `--s3`) Garage node of the network.
pub fn devnet_processes(info: &DevnetInfo) -> Vec<Proc> {
    let mut out = Vec::new();
    for s in &info.sites {
        out.push(Proc {
            label: format!("KME {}", s.name),
            site: s.name.clone(),
            pid: s.kme_pid,
        });
        if s.agent_pid != 0 {
            out.push(Proc {
                label: format!("agent {}", s.name),
                site: s.name.clone(),
                pid: s.agent_pid,
            });
        }
        if let Some(g) = s.s3.as_ref().filter(|g| g.garage_pid != 0) {
            out.push(Proc {
                label: format!("garage {}", s.name),
                site: s.name.clone(),
                pid: g.garage_pid,
            });
        }
    }
    out
}

/// CPU used by each process (and the client) during one job.
#[derive(Debug, Clone, Default)]
pub struct JobCpu {
    /// `(label, site, CPU time)`, the client first.
    pub rows: Vec<(String, String, Duration)>,
}

/// Readings taken before a job.
pub struct Before {
    procs: Vec<(Proc, Duration)>,
    children: Duration,
    client_site: String,
}

/// Reads every process's CPU time before a job run by a client at `client_site`.
pub fn before(procs: &[Proc], client_site: &str) -> Before {
    Before {
        procs: procs
            .iter()
            .map(|p| (p.clone(), process(p.pid).unwrap_or_default()))
            .collect(),
        children: exited_children(),
        client_site: client_site.to_owned(),
    }
}

impl Before {
    /// The CPU each process used since [`before`]; the client's is that of the children
    /// waited for since (call after the client exited).
    pub fn after(&self) -> JobCpu {
        let mut rows = vec![(
            "client".to_owned(),
            self.client_site.clone(),
            exited_children().saturating_sub(self.children),
        )];
        for (p, t0) in &self.procs {
            let t1 = process(p.pid).unwrap_or(*t0);
            rows.push((p.label.clone(), p.site.clone(), t1.saturating_sub(*t0)));
        }
        JobCpu { rows }
    }
}

impl JobCpu {
    /// All processes together.
    pub fn total(&self) -> Duration {
        self.rows.iter().map(|r| r.2).sum()
    }

    /// The CPU time of the busiest site (its KME, agent and, at the client's site, the
    /// client).
    pub fn busiest_site(&self) -> Duration {
        let mut sites: Vec<(&str, Duration)> = Vec::new();
        for (_, site, t) in &self.rows {
            match sites.iter_mut().find(|(s, _)| s == site) {
                Some((_, sum)) => *sum += *t,
                None => sites.push((site, *t)),
            }
        }
        sites.into_iter().map(|(_, t)| t).max().unwrap_or_default()
    }

    /// Throughput (bit/s) if each site ran alone on a machine with `cores` cores: the
    /// busiest site's CPU time spread over its cores. A projection, not a measurement.
    pub fn projected_bps(&self, bytes: u64, cores: f64) -> f64 {
        let t = self.busiest_site().as_secs_f64() / cores;
        if t > 0.0 {
            bytes as f64 * 8.0 / t
        } else {
            f64::NAN
        }
    }
}

/// The disk baseline: a plain copy with fsync, its time and the CPU it used.
pub struct CopyBaseline {
    pub secs: f64,
    pub cpu: Duration,
}

/// Copies `from` to `to`, fsyncs it, removes it again; the CPU is this process's (idle
/// otherwise while the baseline runs).
pub fn copy_baseline(
    from: &std::path::Path,
    to: &std::path::Path,
) -> std::io::Result<CopyBaseline> {
    let me = std::process::id();
    let cpu0 = process(me).unwrap_or_default();
    let t = std::time::Instant::now();
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = process(me).unwrap_or_default().saturating_sub(cpu0);
    std::fs::remove_file(to)?;
    Ok(CopyBaseline { secs, cpu })
}

/// Nanoseconds of `t` per byte of `bytes`.
pub fn ns_per_byte(t: Duration, bytes: u64) -> f64 {
    t.as_nanos() as f64 / bytes.max(1) as f64
}

/// CPU ns per file byte of every process for each job, the total beside a plain copy's,
/// and the projection for one 2-core machine per site.
pub fn print_table(size: u64, jobs: &[(&str, &JobCpu)], copy_cpu: Duration) {
    print!("{:<40}", "CPU ns per file byte (/proc utime+stime)");
    for (name, _) in jobs {
        print!(" {name:>12}");
    }
    println!();
    // Every process of any job, in order of first appearance (a job on another network
    // may have processes the first has not, e.g. object-store nodes).
    let mut labels: Vec<&str> = Vec::new();
    for (_, job) in jobs {
        for (label, _, _) in &job.rows {
            if !labels.contains(&label.as_str()) {
                labels.push(label);
            }
        }
    }
    for label in labels {
        print!("  {label:<38}");
        for (_, job) in jobs {
            match job.rows.iter().find(|r| r.0 == label) {
                Some(r) => print!(" {:>12.2}", ns_per_byte(r.2, size)),
                None => print!(" {:>12}", "-"),
            }
        }
        println!();
    }
    print!("  {:<38}", "total");
    for (_, job) in jobs {
        print!(" {:>12.2}", ns_per_byte(job.total(), size));
    }
    println!();
    println!(
        "  {:<38} {:>12.2}",
        "baseline: cp + fsync of the file",
        ns_per_byte(copy_cpu, size)
    );
    print!("{:<40}", "projection, Gbps (not measured)*");
    for (_, job) in jobs {
        print!(" {:>12.2}", job.projected_bps(size, 2.0) / 1e9);
    }
    println!();
    println!("* if each site ran alone on its own 2-core machine: file bytes / (busiest site's CPU time / 2)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_loop_shows_in_this_process_cpu_time() {
        // Spin until /proc shows 150 ms more CPU time; on a loaded machine that takes longer
        // than 150 ms of wall time, so the bound is a generous deadline, not a duration.
        let pid = std::process::id();
        let t0 = process(pid).expect("own stat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut t1 = t0;
        while t1 - t0 < Duration::from_millis(150) && start.elapsed() < Duration::from_secs(30) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            t1 = process(pid).expect("own stat");
        }
        std::hint::black_box(x);
        assert!(t1 - t0 >= Duration::from_millis(150), "{t0:?} -> {t1:?}");
    }

    #[test]
    fn an_exited_child_counts_once_waited_for() {
        let c0 = exited_children();
        let st = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(st.success());
        assert!(exited_children() > c0);
    }

    #[test]
    fn the_busiest_site_sums_its_processes() {
        let ms = Duration::from_millis;
        let job = JobCpu {
            rows: vec![
                ("client".into(), "A".into(), ms(300)),
                ("KME A".into(), "A".into(), ms(200)),
                ("KME B".into(), "B".into(), ms(400)),
            ],
        };
        assert_eq!(job.total(), ms(900));
        assert_eq!(job.busiest_site(), ms(500));
        // 1,000,000 bytes over 0.5 s / 2 cores = 32 Mbit/s.
        assert!((job.projected_bps(1_000_000, 2.0) - 32e6).abs() < 1.0);
    }
}
