"""What scripts/bench-vs-slurm.sh, scripts/bench-cli-loop.py and scripts/bench-security.sh share:
the benchmark's job (one isolated `exec` task running `/bin/true`, 50 MHz, 16 MiB, no restarts),
percentiles, the machine's busy CPU time, and a free loopback port."""
import os, socket


def job(name):
    """The HCL of a benchmark job named `name`."""
    return f'''job "{name}" {{
  type = "batch"
  group "g" {{
    restart {{
      attempts = 0
      mode = "fail"
    }}
    task "t" {{
      driver = "exec"
      config {{
        command = "/bin/true"
      }}
      resources {{
        cpu = 50
        memory = 16
      }}
    }}
  }}
}}
'''


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def machine_busy():
    """Seconds of CPU the whole machine spent busy (all processes, kernel included): /proc/stat's
    first line less idle and iowait."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
