/* trapfloor CMD [ARGS...]: run CMD with every socket() it makes trapped by a
 * seccomp user notification and answered by this process the cheapest way
 * there is - SECCOMP_USER_NOTIF_FLAG_CONTINUE: the kernel then makes the
 * socket itself, nothing is grafted. The listener is woken on the trapping
 * task's CPU (SYNC_WAKE_UP), as the agent's is.
 *
 * The benchmarks' `trap-floor` path: what any design that takes a socket
 * over through a trap per connection must pay at least (issue 15). On exit
 * prints one JSON line to stderr: traps, supervisor_cpu_us, status.
 * A plain libc program built by the benchmarks with the system compiler. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#if defined(__x86_64__)
#define THIS_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define THIS_ARCH AUDIT_ARCH_AARCH64
#else
#error "trapfloor: an architecture this file does not know"
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

static double cpu_us(const struct rusage *r)
{
	return (r->ru_utime.tv_sec + r->ru_stime.tv_sec) * 1e6 + r->ru_utime.tv_usec +
	       r->ru_stime.tv_usec;
}

int main(int argc, char **argv)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, THIS_ARCH, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socket, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {sizeof f / sizeof f[0], f};
	int sv[2], listener, child_fd, pidfd, status = 0;
	long traps = 0;
	pid_t pid;
	char go;

	if (argc < 2) {
		fprintf(stderr, "usage: trapfloor CMD [ARGS...]\n");
		return 2;
	}
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) {
		perror("trapfloor: socketpair");
		return 2;
	}
	pid = fork();
	if (pid < 0) {
		perror("trapfloor: fork");
		return 2;
	}
	if (pid == 0) {
		/* the filter, then the listener's number to the parent, which takes
		 * it with pidfd_getfd; exec only once the parent holds it */
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
			_exit(126);
		child_fd = syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER,
				   SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
		if (child_fd < 0 || write(sv[1], &child_fd, sizeof child_fd) != sizeof child_fd ||
		    read(sv[1], &go, 1) != 1)
			_exit(126);
		close(child_fd);
		execvp(argv[1], argv + 1);
		_exit(127);
	}
	close(sv[1]);
	if (read(sv[0], &child_fd, sizeof child_fd) != sizeof child_fd) {
		fprintf(stderr, "trapfloor: the child could not install its filter\n");
		waitpid(pid, NULL, 0);
		return 2;
	}
	pidfd = syscall(SYS_pidfd_open, pid, 0);
	listener = pidfd < 0 ? -1 : syscall(SYS_pidfd_getfd, pidfd, child_fd, 0);
	if (listener < 0) {
		perror("trapfloor: pidfd_getfd");
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		return 2;
	}
	/* optional (a kernel >= 6.6): without it the supervisor wakes on any CPU */
	(void)ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP);
	if (write(sv[0], "g", 1) != 1)
		return 2;
	for (;;) {
		struct pollfd p = {.fd = listener, .events = POLLIN};
		struct seccomp_notif req;
		struct seccomp_notif_resp resp;

		if (poll(&p, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p.revents & (POLLHUP | POLLERR))
			break;		/* every filtered task has exited */
		memset(&req, 0, sizeof req);
		if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req)) {
			if (errno == EINTR || errno == ENOENT)
				continue;	/* interrupted, or the caller died meanwhile */
			break;
		}
		memset(&resp, 0, sizeof resp);
		resp.id = req.id;
		resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
		if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) == 0)
			traps++;
	}
	{
		struct rusage self;
		getrusage(RUSAGE_SELF, &self);
		waitpid(pid, &status, 0);
		fprintf(stderr, "{\"traps\": %ld, \"supervisor_cpu_us\": %.0f, \"status\": %d}\n",
			traps, cpu_us(&self), WIFEXITED(status) ? WEXITSTATUS(status) : 128);
	}
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
