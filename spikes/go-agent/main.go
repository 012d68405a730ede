// SPIKE (issue 13): a minimal NovaSandbox guest agent in Go, standard library only.
//
// Not the product: it exists to measure restore -> hello and spawn round trips against
// the Python agent (src/novasandbox/guest/agent.py) before anything is ported. It
// speaks protocol 2 (src/novasandbox/guest/protocol.py) for: hello (clock, hostname,
// entropy, lifetime, thaw; *not* net), ping, exec (argv, env, cwd, timeout, stdin,
// stdout/stderr streamed with flow control), ack, cancel, signal, freeze, thaw,
// lifetime, shutdown. Everything else (files, mount, release, net) answers unknown-op.
//
// As PID 1 (init=/opt/novasandbox/init) it mounts the pseudo file systems, brings up
// loopback, then re-executes itself as the serving child ("serve") and reaps orphans.
// "--stdio" serves stdin/stdout (for trying it without a VM).
package main

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const (
	protocolVersion = 2
	agentVersion    = "0.1.0-go-spike"
	headerSize      = 9
	maxPayload      = 1 << 20
	chunkSize       = 256 * 1024
	frameCost       = 64
	window          = 16 << 20
	portName        = "org.novasandbox.agent"
	guestHome       = "/root"
	defaultPath     = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	outputGrace     = 200 * time.Millisecond

	kindMsg    = 1
	kindStdin  = 2
	kindStdout = 3
	kindStderr = 4
	kindData   = 5
)

var inVM = false

// Measurement only (spike): when the last read returned data, and how many empty
// polls (the host end closed, e.g. right after a restore) came before it.
var (
	lastReadAt    time.Time
	pollsBefore   int
	pollingSince  time.Time
	pollingBefore time.Duration
)

func logf(level int, format string, args ...any) {
	msg := fmt.Sprintf("<%d>novasandbox-agent: %s\n", level, fmt.Sprintf(format, args...))
	if f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		f.WriteString(msg)
		f.Close()
		return
	}
	os.Stderr.WriteString(msg)
}

// ------------------------------------------------------------------------- init duties

func mount(source, target, fstype string, flags uintptr, data string) {
	os.MkdirAll(target, 0o755)
	if err := syscall.Mount(source, target, fstype, flags, data); err != nil && err != syscall.EBUSY {
		logf(3, "mount %s on %s: %v", fstype, target, err)
	}
}

func initSystem() {
	const nosuid, nodev, noexec = syscall.MS_NOSUID, syscall.MS_NODEV, syscall.MS_NOEXEC
	mount("proc", "/proc", "proc", nosuid|nodev|noexec, "")
	mount("sysfs", "/sys", "sysfs", nosuid|nodev|noexec, "")
	mount("devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755")
	mount("devpts", "/dev/pts", "devpts", nosuid|noexec, "gid=5,mode=620,ptmxmode=666")
	mount("tmpfs", "/dev/shm", "tmpfs", nosuid|nodev, "mode=1777")
	mount("tmpfs", "/tmp", "tmpfs", nosuid|nodev, "mode=1777")
	mount("tmpfs", "/run", "tmpfs", nosuid|nodev, "mode=0755")
	for _, l := range [][2]string{{"/dev/fd", "/proc/self/fd"}, {"/dev/stdin", "/proc/self/fd/0"},
		{"/dev/stdout", "/proc/self/fd/1"}, {"/dev/stderr", "/proc/self/fd/2"}} {
		if _, err := os.Lstat(l[0]); err != nil {
			os.Symlink(l[1], l[0])
		}
	}
	if err := interfaceUp("lo"); err != nil {
		logf(6, "loopback not up: %v", err)
	}
}

func ioctl(fd int, req uintptr, arg uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), req, arg); e != 0 {
		return e
	}
	return nil
}

func interfaceUp(name string) error {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	var req [40]byte
	copy(req[:16], name)
	if err := ioctl(fd, syscall.SIOCGIFFLAGS, uintptr(unsafe.Pointer(&req[0]))); err != nil {
		return err
	}
	flags := binary.LittleEndian.Uint16(req[16:18]) | syscall.IFF_UP
	binary.LittleEndian.PutUint16(req[16:18], flags)
	return ioctl(fd, syscall.SIOCSIFFLAGS, uintptr(unsafe.Pointer(&req[0])))
}

func powerOff() {
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART)
	time.Sleep(5 * time.Second)
	os.Exit(1)
}

func runAsInit() {
	initSystem()
	restarts := 0
	for {
		pid, err := syscall.ForkExec("/proc/self/exe", []string{"init", "serve"}, &syscall.ProcAttr{
			Env:   []string{"NOVASANDBOX_IN_VM=1"},
			Files: []uintptr{0, 1, 2},
		})
		if err != nil {
			logf(3, "cannot start the agent: %v", err)
			time.Sleep(time.Second)
			continue
		}
		var status syscall.WaitStatus
		for {
			got, err := syscall.Wait4(-1, &status, 0, nil)
			if err == syscall.EINTR {
				continue
			}
			if got == pid || err != nil {
				break
			}
		}
		if status.Exited() && status.ExitStatus() == 0 {
			powerOff()
		}
		restarts++
		logf(3, "agent exited with status %v; restarting (%d)", status, restarts)
		d := time.Duration(restarts) * 100 * time.Millisecond
		if d > 2*time.Second {
			d = 2 * time.Second
		}
		time.Sleep(d)
	}
}

func findAgentPort() string {
	deadline := time.Now().Add(30 * time.Second)
	for {
		entries, _ := os.ReadDir("/sys/class/virtio-ports")
		for _, e := range entries {
			b, err := os.ReadFile("/sys/class/virtio-ports/" + e.Name() + "/name")
			if err == nil && strings.TrimSpace(string(b)) == portName {
				dev := "/dev/" + e.Name()
				if _, err := os.Stat(dev); err == nil {
					return dev
				}
			}
		}
		if time.Now().After(deadline) {
			logf(3, "virtio port %s not found", portName)
			os.Exit(1)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------- agent

type credit struct {
	mu        sync.Mutex
	cond      *sync.Cond
	left      int
	cancelled bool
	waiting   bool
}

func newCredit() *credit {
	c := &credit{left: window}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *credit) grant(n int) {
	c.mu.Lock()
	c.left += n
	c.cond.Broadcast()
	c.mu.Unlock()
}

func (c *credit) cancel() {
	c.mu.Lock()
	c.cancelled = true
	c.cond.Broadcast()
	c.mu.Unlock()
}

func (c *credit) take(cost int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.left < cost && !c.cancelled {
		c.waiting = true
		c.cond.Wait()
	}
	c.waiting = false
	if c.cancelled {
		return false
	}
	c.left -= cost
	return true
}

type execState struct {
	pid     int
	stdin   chan []byte
	credit  *credit
	mu      sync.Mutex // held while sending output; abandoned set under it
	abandon bool
	sending atomic.Int32 // pumps blocked writing to a slow host: busy, not idle
}

type agent struct {
	rfd, wfd     int
	reconnecting bool
	wmu          sync.Mutex
	mu           sync.Mutex
	execs        map[uint32]*execState
	credits      map[uint32]*credit
	stop         bool
	templateEnv  map[string]string
}

type errReply struct{ code, message string }

func (e *errReply) Error() string { return e.message }

func (a *agent) send(frame []byte) {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	for len(frame) > 0 {
		n, err := syscall.Write(a.wfd, frame)
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN {
			time.Sleep(time.Millisecond)
			continue
		}
		if err != nil {
			return
		}
		frame = frame[n:]
	}
}

func encodeFrame(rid uint32, kind byte, payload []byte) []byte {
	buf := make([]byte, headerSize+len(payload))
	binary.BigEndian.PutUint32(buf[0:4], uint32(len(payload)))
	binary.BigEndian.PutUint32(buf[4:8], rid)
	buf[8] = kind
	copy(buf[headerSize:], payload)
	return buf
}

func (a *agent) reply(rid uint32, op string, fields map[string]any) {
	m := map[string]any{"op": op}
	for k, v := range fields {
		m[k] = v
	}
	body, err := json.Marshal(m)
	if err != nil {
		return
	}
	a.send(encodeFrame(rid, kindMsg, body))
}

func (a *agent) replyError(rid uint32, code, message string, errno any) {
	a.reply(rid, "error", map[string]any{"code": code, "message": message, "errno": errno})
}

func (a *agent) serve() int {
	buf := make([]byte, 0, 1<<16)
	rd := make([]byte, 1<<16)
	idle := 0
	for !a.stop {
		n, err := syscall.Read(a.rfd, rd)
		if err == syscall.EINTR || err == syscall.EAGAIN {
			continue
		}
		if err != nil || n == 0 {
			if !a.reconnecting {
				return 0
			}
			// host end closed (or just restored): poll for a fresh stream
			buf = buf[:0]
			a.mu.Lock()
			for _, c := range a.credits {
				c.cancel()
			}
			a.mu.Unlock()
			if idle == 0 {
				pollingSince = time.Now()
			}
			idle++
			if idle < 500 {
				time.Sleep(2 * time.Millisecond)
			} else {
				time.Sleep(50 * time.Millisecond)
			}
			continue
		}
		lastReadAt = time.Now()
		pollsBefore = idle
		pollingBefore = 0
		if idle > 0 {
			pollingBefore = lastReadAt.Sub(pollingSince)
		}
		idle = 0
		buf = append(buf, rd[:n]...)
		for len(buf) >= headerSize {
			length := binary.BigEndian.Uint32(buf[0:4])
			rid := binary.BigEndian.Uint32(buf[4:8])
			kind := buf[8]
			if length > maxPayload || kind < kindMsg || kind > kindData {
				logf(3, "protocol error, resetting stream (length %d, kind %d)", length, kind)
				buf = buf[:0]
				break
			}
			end := headerSize + int(length)
			if len(buf) < end {
				break
			}
			payload := append([]byte(nil), buf[headerSize:end]...)
			buf = buf[end:]
			a.dispatch(rid, kind, payload)
		}
		if len(buf) == 0 {
			buf = make([]byte, 0, 1<<16)
		}
	}
	return 0
}

func (a *agent) dispatch(rid uint32, kind byte, payload []byte) {
	switch kind {
	case kindStdin:
		a.mu.Lock()
		ex := a.execs[rid]
		a.mu.Unlock()
		if ex != nil && ex.stdin != nil {
			ex.stdin <- payload
		}
		return
	case kindData:
		return // file uploads: not in the spike
	case kindMsg:
	default:
		a.replyError(rid, "protocol-error", "unexpected frame from host", nil)
		return
	}
	var msg map[string]any
	dec := json.NewDecoder(strings.NewReader(string(payload)))
	dec.UseNumber()
	if err := dec.Decode(&msg); err != nil {
		a.replyError(rid, "protocol-error", "message is not valid UTF-8 JSON: "+err.Error(), nil)
		return
	}
	op, ok := msg["op"].(string)
	if !ok {
		a.replyError(rid, "protocol-error", "message is not a JSON object with a string 'op'", nil)
		return
	}
	switch op {
	case "hello":
		a.opHello(rid, msg)
	case "ping":
		a.reply(rid, "pong", nil)
	case "ack":
		n, ok := intField(msg, "bytes")
		if !ok || n <= 0 {
			a.replyError(rid, "bad-request", "bytes must be a positive integer", nil)
			return
		}
		a.mu.Lock()
		c := a.credits[rid]
		a.mu.Unlock()
		if c != nil {
			c.grant(int(n))
		}
	case "cancel":
		a.mu.Lock()
		c := a.credits[rid]
		a.mu.Unlock()
		if c != nil {
			c.cancel()
		}
	case "exec":
		a.startExec(rid, msg)
	case "signal":
		target, ok1 := intField(msg, "target")
		sig, ok2 := intField(msg, "signal")
		if !ok1 || !ok2 {
			a.replyError(rid, "bad-request", "bad request: target and signal", nil)
			return
		}
		a.mu.Lock()
		ex := a.execs[uint32(target)]
		a.mu.Unlock()
		if ex == nil {
			a.replyError(rid, "no-such-process", fmt.Sprintf("no running command %d", target), nil)
			return
		}
		syscall.Kill(-ex.pid, syscall.Signal(sig))
		a.reply(rid, "ok", nil)
	case "freeze":
		syscall.Sync()
		if b, _ := msg["drop_caches"].(bool); b {
			os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
		}
		if err := fsIoctl("/", 0xC0045877); err != nil {
			a.replyErrno(rid, err)
			return
		}
		a.reply(rid, "ok", nil)
	case "thaw":
		thawed, err := thaw()
		if err != nil {
			a.replyErrno(rid, err)
			return
		}
		a.reply(rid, "ok", map[string]any{"thawed": thawed})
	case "lifetime":
		if inVM {
			setLifetime(msg["seconds"])
		}
		a.reply(rid, "ok", nil)
	case "shutdown":
		a.reply(rid, "ok", nil)
		a.stop = true
		a.mu.Lock()
		for _, ex := range a.execs {
			syscall.Kill(-ex.pid, syscall.SIGKILL)
		}
		a.mu.Unlock()
	default:
		a.replyError(rid, "unknown-op", fmt.Sprintf("unknown operation '%s'", op), nil)
	}
}

func (a *agent) replyErrno(rid uint32, err error) {
	var en syscall.Errno
	if errors.As(err, &en) {
		a.replyError(rid, "os-error", en.Error(), int(en))
		return
	}
	a.replyError(rid, "agent-error", err.Error(), nil)
}

func intField(msg map[string]any, name string) (int64, bool) {
	n, ok := msg[name].(json.Number)
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseInt(string(n), 10, 64)
	return v, err == nil
}

func fsIoctl(path string, req uintptr) error {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	return ioctl(fd, req, 0)
}

func thaw() (bool, error) {
	err := fsIoctl("/", 0xC0045878)
	if err == syscall.EINVAL {
		return false, nil
	}
	return err == nil, err
}

var (
	lifeMu    sync.Mutex
	lifeTimer *time.Timer
)

func setLifetime(v any) {
	lifeMu.Lock()
	defer lifeMu.Unlock()
	if lifeTimer != nil {
		lifeTimer.Stop()
		lifeTimer = nil
	}
	n, ok := v.(json.Number)
	if !ok {
		return
	}
	s, err := n.Float64()
	if err != nil || s <= 0 {
		return
	}
	lifeTimer = time.AfterFunc(time.Duration(s*float64(time.Second)), func() {
		logf(3, "the sandbox's lifetime is over: powering off")
		powerOff()
	})
}

func (a *agent) opHello(rid uint32, msg map[string]any) {
	if v, ok := intField(msg, "version"); !ok || v != protocolVersion {
		a.replyError(rid, "version-mismatch",
			fmt.Sprintf("agent speaks protocol %d, host %v", protocolVersion, msg["version"]), nil)
		return
	}
	steps := map[string]any{"polls_before": pollsBefore, "polling_us": pollingBefore.Microseconds(),
		"read_to_hello_us": time.Since(lastReadAt).Microseconds()}
	mark := time.Now()
	step := func(name string) {
		now := time.Now()
		steps[name+"_us"] = now.Sub(mark).Microseconds()
		mark = now
	}
	if inVM {
		if ns, ok := intField(msg, "time_ns"); ok {
			tv := syscall.NsecToTimeval(ns)
			if err := syscall.Settimeofday(&tv); err != nil {
				logf(6, "cannot set clock: %v", err)
			}
			mark = time.Now() // the clock jumped: measure from here
		}
		if h, ok := msg["hostname"].(string); ok {
			if err := syscall.Sethostname([]byte(h)); err != nil {
				logf(6, "cannot set hostname: %v", err)
			}
			step("hostname")
		}
		if e, ok := msg["entropy"].(string); ok {
			if seed, err := hex.DecodeString(e); err == nil {
				if err := reseed(seed); err != nil {
					logf(3, "cannot reseed the RNG: %v", err)
				}
			}
			step("entropy")
		}
		if v, ok := msg["lifetime_s"]; ok {
			setLifetime(v)
			step("lifetime")
		}
		if b, _ := msg["thaw"].(bool); b {
			if _, err := thaw(); err != nil {
				logf(3, "cannot thaw /: %v", err)
			}
			step("thaw")
		}
		// "net": not in the spike (the benchmarks run without a network)
	}
	var uts syscall.Utsname
	syscall.Uname(&uts)
	rel := make([]byte, 0, 65)
	for _, c := range uts.Release {
		if c == 0 {
			break
		}
		rel = append(rel, byte(c))
	}
	step("uname")
	a.reply(rid, "hello", map[string]any{
		"version": protocolVersion, "agent": agentVersion, "kernel": string(rel), "pid": os.Getpid(),
		"steps": steps,
	})
}

func reseed(seed []byte) error {
	words := len(seed) / 4
	info := make([]byte, 8+words*4)
	binary.LittleEndian.PutUint32(info[0:4], uint32(words*32))
	binary.LittleEndian.PutUint32(info[4:8], uint32(words*4))
	copy(info[8:], seed[:words*4])
	fd, err := syscall.Open("/dev/urandom", syscall.O_WRONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	if err := ioctl(fd, 0x40085203, uintptr(unsafe.Pointer(&info[0]))); err != nil {
		return err
	}
	return ioctl(fd, 0x5207, 0)
}

// ---------------------------------------------------------------------------- exec

func lookPath(file string, path string) (string, error) {
	if strings.Contains(file, "/") {
		return file, nil
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := dir + "/" + file
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", os.ErrNotExist
}

func (a *agent) startExec(rid uint32, msg map[string]any) {
	raw, ok := msg["argv"].([]any)
	argv := make([]string, 0, len(raw))
	for _, v := range raw {
		s, isStr := v.(string)
		if !isStr {
			ok = false
			break
		}
		argv = append(argv, s)
	}
	if !ok || len(argv) == 0 {
		a.replyError(rid, "bad-request", "bad request: argv must be a non-empty list of strings", nil)
		return
	}
	env := map[string]string{"PATH": defaultPath, "HOME": guestHome, "LANG": "C.UTF-8", "USER": "root"}
	for k, v := range a.templateEnv {
		env[k] = v
	}
	if rawEnv, present := msg["env"]; present && rawEnv != nil {
		e, isMap := rawEnv.(map[string]any)
		if !isMap {
			a.replyError(rid, "bad-request", "bad request: env must be a mapping", nil)
			return
		}
		for k, v := range e {
			s, isStr := v.(string)
			if !isStr {
				a.replyError(rid, "bad-request", "bad request: env values must be strings", nil)
				return
			}
			env[k] = s
		}
	}
	cwd, _ := msg["cwd"].(string)
	if cwd == "" {
		cwd = guestHome
	}
	if st, err := os.Stat(cwd); err != nil || !st.IsDir() {
		a.replyError(rid, "invalid-cwd", fmt.Sprintf("working directory '%s' does not exist", cwd), nil)
		return
	}
	path, err := lookPath(argv[0], env["PATH"])
	if err != nil {
		a.replyError(rid, "command-not-found", "command not found: "+argv[0], nil)
		return
	}
	envList := make([]string, 0, len(env))
	for k, v := range env {
		envList = append(envList, k+"="+v)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		a.replyErrno(rid, err)
		return
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		a.replyErrno(rid, err)
		return
	}
	cmd := &exec.Cmd{Path: path, Args: argv, Env: envList, Dir: cwd, Stdout: outW, Stderr: errW,
		SysProcAttr: &syscall.SysProcAttr{Setsid: true}}
	var stdinW *os.File
	if b, _ := msg["stdin"].(bool); b {
		var inR *os.File
		inR, stdinW, err = os.Pipe()
		if err == nil {
			cmd.Stdin = inR
			defer inR.Close()
		}
	}
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		if stdinW != nil {
			stdinW.Close()
		}
		if errors.Is(err, os.ErrPermission) {
			a.replyError(rid, "permission-denied", "permission denied: "+argv[0], nil)
		} else if errors.Is(err, os.ErrNotExist) {
			a.replyError(rid, "command-not-found", "command not found: "+argv[0], nil)
		} else {
			a.replyErrno(rid, err)
		}
		return
	}
	ex := &execState{pid: cmd.Process.Pid, credit: newCredit()}
	if stdinW != nil {
		ex.stdin = make(chan []byte, 64)
		go func() {
			for data := range ex.stdin {
				if len(data) == 0 {
					break
				}
				if _, err := stdinW.Write(data); err != nil {
					break
				}
			}
			stdinW.Close()
			for range ex.stdin { // drain until the request ends
			}
		}()
	}
	a.mu.Lock()
	a.execs[rid] = ex
	a.credits[rid] = ex.credit
	a.mu.Unlock()
	a.reply(rid, "started", map[string]any{"pid": ex.pid})
	var timeout time.Duration
	if n, isNum := msg["timeout"].(json.Number); isNum {
		if s, err := n.Float64(); err == nil && s > 0 {
			timeout = time.Duration(s * float64(time.Second))
		}
	}
	go a.runExec(rid, cmd, ex, outR, errR, timeout)
}

func (a *agent) runExec(rid uint32, cmd *exec.Cmd, ex *execState, outR, errR *os.File, timeout time.Duration) {
	var lastOutput sync.Mutex
	last := time.Now()
	touch := func() { lastOutput.Lock(); last = time.Now(); lastOutput.Unlock() }
	done := make(chan struct{}, 2)
	pump := func(f *os.File, kind byte) {
		defer func() { f.Close(); done <- struct{}{} }()
		buf := make([]byte, chunkSize)
		for {
			n, err := f.Read(buf)
			if n > 0 {
				touch()
				if ex.credit.take(n + frameCost) {
					ex.sending.Add(1)
					ex.mu.Lock()
					if !ex.abandon {
						a.send(encodeFrame(rid, kind, buf[:n]))
					}
					ex.mu.Unlock()
					ex.sending.Add(-1)
				}
				touch()
			}
			if err != nil {
				return
			}
		}
	}
	go pump(outR, kindStdout)
	go pump(errR, kindStderr)
	timedOut := false
	var timer *time.Timer
	if timeout > 0 {
		timer = time.AfterFunc(timeout, func() {
			timedOut = true
			syscall.Kill(-ex.pid, syscall.SIGKILL)
		})
	}
	cmd.Wait()
	if timer != nil {
		timer.Stop()
	}
	touch()
	pending := 2
	for pending > 0 {
		lastOutput.Lock()
		idle := time.Since(last)
		lastOutput.Unlock()
		ex.credit.mu.Lock()
		busy := ex.credit.waiting || ex.sending.Load() > 0
		ex.credit.mu.Unlock()
		if idle >= outputGrace && !busy {
			break
		}
		wait := outputGrace - idle
		if wait < 10*time.Millisecond {
			wait = 10 * time.Millisecond
		}
		select {
		case <-done:
			pending--
		case <-time.After(wait):
		}
	}
	ex.mu.Lock()
	ex.abandon = true
	ex.credit.cancel()
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	var sig any
	code := ws.ExitStatus()
	if ws.Signaled() {
		sig = int(ws.Signal())
		code = 128 + int(ws.Signal())
	}
	a.reply(rid, "exit", map[string]any{"exit_code": code, "signal": sig, "timed_out": timedOut})
	ex.mu.Unlock()
	a.mu.Lock()
	delete(a.execs, rid)
	delete(a.credits, rid)
	a.mu.Unlock()
	if ex.stdin != nil {
		close(ex.stdin) // a late STDIN frame after this would panic: the real port must guard it
	}
}

// ---------------------------------------------------------------------------- main

func loadTemplateEnv() map[string]string {
	env := map[string]string{}
	exe, _ := os.Executable()
	data, err := os.ReadFile(filepath.Join(filepath.Dir(exe), "template.json"))
	if err != nil || len(data) > 64*1024 {
		return env
	}
	var doc struct {
		Env map[string]string `json:"env"`
	}
	if json.Unmarshal(data, &doc) == nil && doc.Env != nil {
		env = doc.Env
	}
	return env
}

func newAgent(rfd, wfd int, reconnecting bool) *agent {
	return &agent{rfd: rfd, wfd: wfd, reconnecting: reconnecting, execs: map[uint32]*execState{},
		credits: map[uint32]*credit{}, templateEnv: loadTemplateEnv()}
}

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "--stdio" {
		os.Exit(newAgent(0, 1, false).serve())
	}
	if len(args) > 0 && args[0] == "spawnbench" {
		spawnBench(args[1:])
		return
	}
	if os.Getpid() == 1 {
		signalIgnoreTerm()
		runAsInit()
		return
	}
	inVM = os.Getenv("NOVASANDBOX_IN_VM") == "1"
	port := findAgentPort()
	fd, err := syscall.Open(port, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		logf(3, "cannot open %s: %v", port, err)
		os.Exit(1)
	}
	a := newAgent(fd, fd, true)
	body, _ := json.Marshal(map[string]any{"op": "agent-started", "pid": os.Getpid()})
	a.send(encodeFrame(0, kindMsg, body))
	os.Exit(a.serve())
}

func signalIgnoreTerm() { signal.Ignore(syscall.SIGTERM) }

// spawnBench: "init spawnbench N" times N spawns of /bin/true three ways (ms, one per line
// as JSON): os/exec bare (clone(CLONE_VFORK)), os/exec with the pipes and session the
// agent sets up, syscall.ForkExec.
func spawnBench(args []string) {
	n := 20
	if len(args) > 0 {
		n, _ = strconv.Atoi(args[0])
	}
	res := map[string][]float64{}
	for i := 0; i < n; i++ {
		t0 := time.Now()
		exec.Command("/bin/true").Run()
		res["go_exec"] = append(res["go_exec"], float64(time.Since(t0).Microseconds())/1000)

		t0 = time.Now()
		outR, outW, _ := os.Pipe()
		errR, errW, _ := os.Pipe()
		cmd := &exec.Cmd{Path: "/bin/true", Args: []string{"true"}, Stdout: outW, Stderr: errW,
			SysProcAttr: &syscall.SysProcAttr{Setsid: true}}
		cmd.Start()
		outW.Close()
		errW.Close()
		io.Copy(io.Discard, outR)
		io.Copy(io.Discard, errR)
		cmd.Wait()
		outR.Close()
		errR.Close()
		res["go_exec_pipes_setsid"] = append(res["go_exec_pipes_setsid"], float64(time.Since(t0).Microseconds())/1000)

		t0 = time.Now()
		pid, _ := syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{})
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, 0, nil)
		res["go_forkexec"] = append(res["go_forkexec"], float64(time.Since(t0).Microseconds())/1000)
	}
	out, _ := json.Marshal(res)
	os.Stdout.Write(append(out, '\n'))
}
