"""`python -m nebula.agent.launch COMMAND...`: run COMMAND so that it dies with supervisord.

supervisord starts each program in its own process group, so when supervisord
itself is killed (kill -9, OOM), its children live on as orphans: an agent that
keeps heartbeating, engines that keep their ports, and a restarted node that
starts a second engine on a port the orphan holds. Linux can tie a process's
life to its parent's: PR_SET_PDEATHSIG delivers a signal when the parent dies,
and the setting survives exec. This launcher sets it (SIGTERM: vLLM shuts its
engine-core and worker processes down on it) and execs the command in its own
place, so supervisord still sees, signals and reaps the engine itself.

Kept to the standard library (and nebula.process): it runs before every engine start.
"""

from __future__ import annotations

import os
import sys

from nebula.process import die_with_parent


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m nebula.agent.launch COMMAND [ARG...]", file=sys.stderr)
        sys.exit(2)
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
