/* fuzz_socket.c: libFuzzer target for the server's socket path (src/serve/server.c with the real
   libuv loop thread): the input is a script of client actions over four loopback connections:
   connect, partial writes of arbitrary bytes or of whole canned requests, pipelining, half close,
   close, close with a reset (RST), slow or no reads, pauses, and a fake trainer that answers or
   fails predictions. After each script every client is closed and a fresh GET /healthz must be
   answered 200 (nothing a client does may make the server refuse a liveness probe or die: this
   process does not ignore SIGPIPE), buffered bodies must stay within max_body_total and the pool
   within max_connections.
   Build: tests/fuzz/run.sh (clang -fsanitize=fuzzer,address,undefined ... src/serve/*.c -luv). */
#include <arpa/inet.h>
#include <errno.h>
#include <time.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kdpeers/serve.h"

enum { NCLIENTS = 4, DIM = 4 };

static kdp_server *srv;
static int port;
static int fds[NCLIENTS] = {-1, -1, -1, -1};

/* Canned requests: the fuzzer reaches complete, valid requests in one byte. */
static const char *const canned[8] = {
    "GET /healthz HTTP/1.1\r\nHost: f\r\n\r\n",
    "GET /metrics HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n", /* pipelined */
    "HEAD /metrics HTTP/1.1\r\n\r\n",
    "POST /control HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"action\":\"pause\"}\n",
    "POST /predict HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"input\":[1,2,3,4]}",
    "POST /predict HTTP/1.1\r\nContent-Type: application/msgpack\r\nContent-Length: 15\r\n\r\n"
    "\x81\xa5input\xc4\x04\x01\x02\x03\x04",
    "POST /control HTTP/1.1\r\nContent-Length: 2000\r\n\r\n", /* a body that never comes */
    "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
};

static void start_server(void) {
  kdp_server_options o;
  kdp_server_options_defaults(&o);
  o.port = 0;
  o.quiet = 1;
  o.input_dim = DIM;
  o.max_predict = 3;
  o.max_connections = NCLIENTS;
  o.max_body = 2048;
  o.max_body_total = 4096;
  o.idle_timeout = 0.5;
  o.header_timeout = 0.05;
  o.min_rate = 20000;
  o.predict_timeout = 0.05;
  o.control_range[KDP_CONTROL_LR_SCALE] = (kdp_range){0, 10, KDP_RANGE_LO | KDP_RANGE_HI};
  kdp_error err;
  if (kdp_server_start(&srv, &o, &err) != 0) {
    fprintf(stderr, "fuzz_socket: %s\n", err.msg);
    abort();
  }
  port = kdp_server_port(srv);
  kdp_server_publish(srv, "# TYPE fuzz gauge\nfuzz 1\n", "{\"fuzz\":true}");
}

static int connect_client(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) abort();
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) abort(); /* loopback: immediate */
  return fd;
}

static void close_client(int k, int reset) {
  if (fds[k] < 0) return;
  if (reset) { /* RST instead of FIN */
    struct linger l = {1, 0};
    setsockopt(fds[k], SOL_SOCKET, SO_LINGER, &l, sizeof l);
  }
  close(fds[k]);
  fds[k] = -1;
}

static void trainer(int answer) {
  kdp_command cmd;
  while (kdp_server_poll_command(srv, &cmd)) {
  }
  kdp_predict_req *r;
  while ((r = kdp_server_take_predict(srv)) != NULL) {
    if (!answer) {
      kdp_server_fail_predict(srv, r, 503, "fuzz trainer says no");
      continue;
    }
    float peers[2 * 3 * 3], ens[3 * 3];
    for (int i = 0; i < 2 * 3 * 3; i++) peers[i] = 0.5f;
    for (int i = 0; i < 3 * 3; i++) ens[i] = 1.0f / 3;
    kdp_predict_result res = {2, 3, peers, ens, NULL, NULL};
    kdp_server_answer_predict(srv, r, &res);
  }
}

/* Waits up to quarters x 0.25 ms for the server to send something to a client (it works
   meanwhile). */
static void settle(int quarters) {
  struct pollfd p[NCLIENTS];
  int n = 0;
  for (int k = 0; k < NCLIENTS; k++)
    if (fds[k] >= 0) p[n].fd = fds[k], p[n].events = POLLIN, p[n].revents = 0, n++;
  struct timespec ts = {0, 250000L * quarters};
  (void)ppoll(n ? p : NULL, (nfds_t)n, &ts, NULL);
}

/* A fresh connection's GET /healthz must be answered 200 within 5 s. */
static void check_healthz(void) {
  int fd = connect_client();
  static const char req[] = "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n";
  if (send(fd, req, sizeof req - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof req - 1)) abort();
  char buf[512];
  size_t got = 0;
  while (got < 12) {
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 5000) != 1) {
      fprintf(stderr, "fuzz_socket: /healthz got no answer within 5 s\n");
      abort();
    }
    ssize_t r = recv(fd, buf + got, sizeof buf - 1 - got, 0);
    if (r <= 0) {
      fprintf(stderr, "fuzz_socket: /healthz connection closed without an answer\n");
      abort();
    }
    got += (size_t)r;
  }
  buf[got] = 0;
  if (strncmp(buf, "HTTP/1.1 200 ", 13) != 0) {
    fprintf(stderr, "fuzz_socket: /healthz answered: %.60s\n", buf);
    abort();
  }
  close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!srv) start_server();
  size_t i = 0;
  int ops = 0;
  while (i < size && ops++ < 64) {
    uint8_t b = data[i++];
    int k = b & 3, op = (b >> 2) & 7, arg = b >> 5;
    switch (op) {
    case 0: /* connect */
      if (fds[k] < 0) fds[k] = connect_client();
      break;
    case 1: { /* a partial write of raw bytes from the input */
      size_t len = i < size ? (size_t)data[i++] * (size_t)(arg + 1) + 1 : 0;
      if (len > size - i) len = size - i;
      if (fds[k] >= 0 && len) (void)send(fds[k], data + i, len, MSG_NOSIGNAL | MSG_DONTWAIT);
      i += len;
      break;
    }
    case 2: /* a canned request, whole or its first part */
      if (fds[k] >= 0) {
        const char *r = canned[arg];
        size_t len = strlen(r);
        if (i < size && (data[i] & 1)) len = (size_t)data[i] % (len + 1);
        i += i < size;
        (void)send(fds[k], r, len, MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      break;
    case 3: /* half close: the server sees EOF after what was sent */
      if (fds[k] >= 0) (void)shutdown(fds[k], SHUT_WR);
      break;
    case 4: /* close, or reset */
      close_client(k, arg & 1);
      break;
    case 5: /* a slow reader takes a little of what the server sent */
      if (fds[k] >= 0) {
        char buf[512];
        (void)recv(fds[k], buf, (size_t)(arg + 1) * 64, MSG_DONTWAIT);
      }
      break;
    case 6: /* the trainer answers (or fails) the predictions waiting */
      trainer(arg & 1);
      break;
    case 7: /* give the server time */
      settle(arg);
      break;
    }
  }
  trainer(1);
  for (int k = 0; k < NCLIENTS; k++) close_client(k, k & 1);
  check_healthz();
  kdp_server_stats st;
  kdp_server_get_stats(srv, &st);
  if (st.body_bytes > 4096 || st.connections_open > NCLIENTS) {
    fprintf(stderr, "fuzz_socket: body_bytes %zu, connections_open %d over their caps\n",
            st.body_bytes, st.connections_open);
    abort();
  }
  return 0;
}
