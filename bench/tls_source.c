/*
 * tls_source: smtp-source's job with STARTTLS, in C, so that the load generator costs
 * the machine little next to the servers it measures (bench/intake.py --tls).
 *
 *   tls_source [-s SESSIONS] [-m MESSAGES] [-l BYTES] [--plain] [--resume]
 *              [--tls12] [-t TIMEOUT] HOST:PORT
 *
 * S threads (blocking sockets), each sending its share of M messages, one message per
 * connection, one command at a time: banner 220, EHLO 250 (must offer STARTTLS),
 * STARTTLS 220, the handshake (TLS 1.2 or 1.3; no certificate check, as an
 * opportunistic MTA client does: the peer's signature is still verified by the
 * handshake itself), EHLO 250, MAIL 250, RCPT 250, DATA 354, a body of about -l
 * bytes and the dot 250, QUIT 221, close_notify, close.  ``--plain`` leaves out
 * STARTTLS (smtp-source's shape, for a cross-check and for the handshake's share of
 * a server's CPU); ``--resume`` offers the connection's last TLS session (ticket) on
 * the next one, as a client with a session cache does; ``--tls12`` caps at TLS 1.2.
 *
 * Every reply code is checked.  Any other reply, a dropped connection, a failed
 * handshake, a timeout or bytes the server sent unasked after its 220 to STARTTLS is
 * an error: counted, the first few printed on stderr, and the exit status is 1.  A
 * message counts as sent only when the reply after its dot was 250.
 *
 * Output, one line on stdout (key=value, for bench/intake.py):
 *   messages=M ok=N errors=E wall=SECONDS cpu=SECONDS resumed=R tickets=T
 *   tls=VERSION cipher=NAME rate=N/s
 * cpu is this process's user+system time over the run (all threads); tickets is the
 * number of session tickets the server sent in all (TLS 1.3 sends them after each
 * full handshake); tls/cipher are the last connection's.  A second line,
 *   wait_ms=connect:MS,banner:MS,ehlo:MS,...,dot:MS,quit:MS
 * says how long a message waited for each reply on average (dot: the reply to the
 * end of data, i.e. the server's commit): where a server makes its clients wait.
 *
 * Build: gcc -O2 -pthread -o tls_source tls_source.c -lssl -lcrypto
 */

#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define REPLY_MAX 8192
#define MAX_PRINTED 10

/* The steps of a message, timed: where a server makes its clients wait. */
enum phase { CONNECT, BANNER, EHLO, STARTTLS, HANDSHAKE, EHLO_TLS, MAIL, RCPT, DATA, DOT,
             QUIT, PHASES };
static const char *const phase_names[PHASES] = {
    "connect", "banner", "ehlo", "starttls", "handshake", "ehlo2", "mail", "rcpt", "data",
    "dot", "quit"};

struct conn {
    int fd;
    SSL *ssl;
    char buf[REPLY_MAX];
    size_t have;          /* bytes in buf */
    char reply[REPLY_MAX]; /* the last complete reply, NUL-terminated */
};

struct worker {
    pthread_t thread;
    int index;
    long count;     /* messages to send */
    long ok;        /* 250 after the dot */
    long errors;
    long resumed;
    long tickets;
    SSL_SESSION *session; /* the last ticket, offered with --resume */
    double spent[PHASES]; /* seconds waited in each step, over all messages */
    double mark;          /* when the current step began */
    char version[32];
    char cipher[64];
};

static struct addrinfo *target;
static SSL_CTX *ctx;
static int plain, resume, timeout_s = 60;
static char *body;
static size_t body_len;
static pthread_barrier_t start_line;
static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;
static long printed;
static int ticket_index;

static void error_at(struct worker *w, const char *fmt, ...)
{
    va_list ap;

    w->errors++;
    pthread_mutex_lock(&print_lock);
    if (printed++ < MAX_PRINTED) {
        fprintf(stderr, "tls_source: session %d: ", w->index);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
    }
    pthread_mutex_unlock(&print_lock);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The step ``p`` ended now; the next one starts. */
static void lap(struct worker *w, enum phase p)
{
    double t = now();
    w->spent[p] += t - w->mark;
    w->mark = t;
}

static const char *ssl_reason(void)
{
    unsigned long e = ERR_get_error();
    const char *r;

    ERR_clear_error();
    if (e == 0)
        return errno ? strerror(errno) : "connection closed";
    r = ERR_reason_error_string(e);
    return r ? r : "unknown OpenSSL error";
}

/* Write all of data; 0 or -1 with the reason in *why. */
static int send_all(struct conn *c, const char *data, size_t len, const char **why)
{
    while (len > 0) {
        ssize_t n;
        if (c->ssl) {
            size_t done = 0;
            errno = 0;
            if (SSL_write_ex(c->ssl, data, len, &done) <= 0) {
                *why = ssl_reason();
                return -1;
            }
            n = (ssize_t) done;
        } else {
            n = send(c->fd, data, len, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                *why = errno == EAGAIN ? "timeout" : strerror(errno);
                return -1;
            }
        }
        data += n;
        len -= (size_t) n;
    }
    return 0;
}

static ssize_t receive(struct conn *c, char *into, size_t room, const char **why)
{
    if (c->ssl) {
        size_t got = 0;
        int rc;
        errno = 0;
        rc = SSL_read_ex(c->ssl, into, room, &got);
        if (rc <= 0) {
            int kind = SSL_get_error(c->ssl, rc);
            if (kind == SSL_ERROR_ZERO_RETURN)
                *why = "server sent close_notify";
            else if (kind == SSL_ERROR_SYSCALL && errno == EAGAIN)
                *why = "timeout";
            else
                *why = ssl_reason();
            return -1;
        }
        return (ssize_t) got;
    }
    for (;;) {
        ssize_t n = recv(c->fd, into, room, 0);
        if (n > 0)
            return n;
        if (n == 0) {
            *why = "server closed the connection";
            return -1;
        }
        if (errno != EINTR) {
            *why = errno == EAGAIN ? "timeout" : strerror(errno);
            return -1;
        }
    }
}

/*
 * Read one complete reply (a multi-line reply ends with "DDD "); it is left in
 * c->reply.  Returns its code, or -1 with the reason in *why.
 */
static int read_reply(struct conn *c, const char **why)
{
    for (;;) {
        size_t start = 0;
        char *nl;
        while ((nl = memchr(c->buf + start, '\n', c->have - start)) != NULL) {
            size_t end = (size_t) (nl - c->buf) + 1;
            const char *line = c->buf + start;
            size_t len = end - start;
            if (len < 4 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9'
                || line[2] < '0' || line[2] > '9' || (line[3] != ' ' && line[3] != '-'
                                                      && line[3] != '\r')) {
                *why = "malformed reply line";
                memcpy(c->reply, line, len < 200 ? len : 200);
                c->reply[len < 200 ? len : 200] = 0;
                return -1;
            }
            start = end;
            if (line[3] != '-') {
                int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
                memcpy(c->reply, c->buf, end);
                c->reply[end] = 0;
                memmove(c->buf, c->buf + end, c->have - end);
                c->have -= end;
                return code;
            }
        }
        if (c->have >= sizeof(c->buf) - 1) {
            *why = "reply longer than 8 KB";
            return -1;
        }
        ssize_t n = receive(c, c->buf + c->have, sizeof(c->buf) - 1 - c->have, why);
        if (n < 0)
            return -1;
        c->have += (size_t) n;
    }
}

/* Send a command (or nothing), expect ``code``; 0, or -1 after counting the error. */
static int step(struct worker *w, struct conn *c, enum phase p, const char *what,
                const char *data, size_t len, int code)
{
    const char *why = NULL;
    int got;

    w->mark = now();

    if (len && send_all(c, data, len, &why) < 0) {
        error_at(w, "%s: sending failed: %s", what, why);
        return -1;
    }
    got = read_reply(c, &why);
    if (got < 0) {
        error_at(w, "%s: no reply: %s", what, why);
        return -1;
    }
    if (got != code) {
        size_t n = strcspn(c->reply, "\r\n");
        error_at(w, "%s: expected %d, got: %.*s", what, code, (int) (n > 200 ? 200 : n),
                 c->reply);
        return -1;
    }
    lap(w, p);
    return 0;
}

static int new_ticket(SSL *ssl, SSL_SESSION *session)
{
    struct worker *w = SSL_get_ex_data(ssl, ticket_index);

    w->tickets++;
    if (!resume)
        return 0; /* OpenSSL frees it */
    if (w->session)
        SSL_SESSION_free(w->session);
    w->session = session; /* ours now */
    return 1;
}

#define CMD(s) (s), sizeof(s) - 1

static void one_message(struct worker *w)
{
    struct conn *c = calloc(1, sizeof(*c));
    struct timeval tv = {timeout_s, 0};
    int done = 0;

    if (!c) {
        error_at(w, "out of memory");
        return;
    }
    c->fd = socket(target->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        error_at(w, "socket: %s", strerror(errno));
        free(c);
        return;
    }
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    /*
     * Nagle stays on, as in Postfix's smtp client and smtplib: with TCP_NODELAY the
     * client's Finished and its EHLO leave as two segments, the server's ticket goes
     * unacknowledged (delayed ACK) and a server that writes its EHLO reply under Nagle
     * (Postfix's smtpd) waits 40 ms for that ACK on every connection.
     */
    w->mark = now();
    if (connect(c->fd, target->ai_addr, target->ai_addrlen) < 0) {
        error_at(w, "connect: %s", strerror(errno));
        goto out;
    }
    lap(w, CONNECT);
    if (step(w, c, BANNER, "banner", NULL, 0, 220) < 0
        || step(w, c, EHLO, "EHLO", CMD("EHLO bench.example\r\n"), 250) < 0)
        goto out;
    if (!plain) {
        const char *why = NULL;
        if (!strstr(c->reply, "STARTTLS")) {
            error_at(w, "EHLO: STARTTLS not offered");
            goto out;
        }
        if (step(w, c, STARTTLS, "STARTTLS", CMD("STARTTLS\r\n"), 220) < 0)
            goto out;
        if (c->have) {
            error_at(w, "STARTTLS: %zu bytes after the 220 (injection?)", c->have);
            goto out;
        }
        c->ssl = SSL_new(ctx);
        if (!c->ssl) {
            error_at(w, "SSL_new: %s", ssl_reason());
            goto out;
        }
        SSL_set_ex_data(c->ssl, ticket_index, w);
        SSL_set_fd(c->ssl, c->fd);
        if (resume && w->session)
            SSL_set_session(c->ssl, w->session);
        errno = 0;
        w->mark = now();
        if (SSL_connect(c->ssl) != 1) {
            why = ssl_reason();
            error_at(w, "TLS handshake failed: %s", why);
            SSL_free(c->ssl);
            c->ssl = NULL;
            goto out;
        }
        lap(w, HANDSHAKE);
        w->resumed += SSL_session_reused(c->ssl);
        if (step(w, c, EHLO_TLS, "EHLO after STARTTLS", CMD("EHLO bench.example\r\n"), 250) < 0)
            goto out;
        if (strstr(c->reply, "STARTTLS")) {
            error_at(w, "EHLO after STARTTLS: STARTTLS offered again");
            goto out;
        }
    }
    if (step(w, c, MAIL, "MAIL", CMD("MAIL FROM:<bench@example.org>\r\n"), 250) < 0
        || step(w, c, RCPT, "RCPT", CMD("RCPT TO:<sink@example.net>\r\n"), 250) < 0
        || step(w, c, DATA, "DATA", CMD("DATA\r\n"), 354) < 0
        || step(w, c, DOT, "end of data", body, body_len, 250) < 0)
        goto out;
    w->ok++;
    if (step(w, c, QUIT, "QUIT", CMD("QUIT\r\n"), 221) < 0)
        goto out;
    done = 1;
out:
    if (c->ssl) {
        if (done) {
            snprintf(w->version, sizeof(w->version), "%s", SSL_get_version(c->ssl));
            snprintf(w->cipher, sizeof(w->cipher), "%s", SSL_get_cipher_name(c->ssl));
            SSL_shutdown(c->ssl); /* close_notify, as an MTA's client sends; no wait */
        }
        SSL_free(c->ssl);
    }
    ERR_clear_error();
    close(c->fd);
    free(c);
}

static void *run(void *arg)
{
    struct worker *w = arg;

    pthread_barrier_wait(&start_line);
    for (long i = 0; i < w->count; i++)
        one_message(w);
    return NULL;
}

static void make_body(size_t size)
{
    static const char head[] = "From: <bench@example.org>\r\nTo: <sink@example.net>\r\n"
                               "Subject: bench\r\n\r\n";
    const size_t line = 78; /* 76 characters and CRLF */
    size_t lines = size / line ? size / line : 1;
    char *p;

    body_len = sizeof(head) - 1 + lines * line + 3;
    body = p = malloc(body_len + 1);
    if (!body) {
        perror("tls_source: malloc");
        exit(2);
    }
    memcpy(p, head, sizeof(head) - 1);
    p += sizeof(head) - 1;
    for (size_t i = 0; i < lines; i++, p += line) {
        memset(p, 'x', line - 2);
        memcpy(p + line - 2, "\r\n", 2);
    }
    memcpy(p, ".\r\n", 3);
}

static double cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double) ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
           + (double) ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void usage(void)
{
    fprintf(stderr, "usage: tls_source [-s SESSIONS] [-m MESSAGES] [-l BYTES] [--plain] "
                    "[--resume] [--tls12] [-t TIMEOUT] HOST:PORT\n");
    exit(2);
}

static long number(const char *text, long low)
{
    char *end;
    long n = strtol(text, &end, 10);
    if (*text == 0 || *end != 0 || n < low)
        usage();
    return n;
}

int main(int argc, char **argv)
{
    long sessions = 1, messages = 100, size = 2048;
    int tls12 = 0;
    const char *where = NULL;
    struct addrinfo hints = {0};
    struct worker *workers;
    char host[256], *colon;
    double t0, c0, wall, used;
    long ok = 0, errors = 0, resumed = 0, tickets = 0;
    double spent[PHASES] = {0};
    int rc;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--plain"))
            plain = 1;
        else if (!strcmp(a, "--resume"))
            resume = 1;
        else if (!strcmp(a, "--tls12"))
            tls12 = 1;
        else if (!strcmp(a, "-s") && i + 1 < argc)
            sessions = number(argv[++i], 1);
        else if (!strcmp(a, "-m") && i + 1 < argc)
            messages = number(argv[++i], 1);
        else if (!strcmp(a, "-l") && i + 1 < argc)
            size = number(argv[++i], 0);
        else if (!strcmp(a, "-t") && i + 1 < argc)
            timeout_s = (int) number(argv[++i], 1);
        else if (a[0] == '-' || where)
            usage();
        else
            where = a;
    }
    if (!where || strlen(where) >= sizeof(host) || !(colon = strrchr(where, ':')))
        usage();
    memcpy(host, where, (size_t) (colon - where));
    host[colon - where] = 0;
    if (host[0] == '[' && host[strlen(host) - 1] == ']') {
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = 0;
    }
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    if ((rc = getaddrinfo(host, colon + 1, &hints, &target)) != 0) {
        fprintf(stderr, "tls_source: %s: %s\n", where, gai_strerror(rc));
        return 2;
    }
    make_body((size_t) size);
    if (!plain) {
        ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx || !SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)
            || (tls12 && !SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION))) {
            fprintf(stderr, "tls_source: SSL_CTX: %s\n", ssl_reason());
            return 2;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_read_ahead(ctx, 1); /* a record in one read, not header then body */
        /* The callback sees every ticket; OpenSSL keeps none of them itself. */
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT
                                                | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(ctx, new_ticket);
        ticket_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    }
    if (messages < sessions)
        sessions = messages;
    workers = calloc((size_t) sessions, sizeof(*workers));
    if (!workers || pthread_barrier_init(&start_line, NULL, (unsigned) sessions + 1)) {
        perror("tls_source");
        return 2;
    }
    for (long i = 0; i < sessions; i++) {
        workers[i].index = (int) i;
        workers[i].count = messages / sessions + (i < messages % sessions);
        if ((rc = pthread_create(&workers[i].thread, NULL, run, &workers[i])) != 0) {
            fprintf(stderr, "tls_source: pthread_create: %s\n", strerror(rc));
            return 2;
        }
    }
    c0 = cpu();
    t0 = now();
    pthread_barrier_wait(&start_line);
    for (long i = 0; i < sessions; i++)
        pthread_join(workers[i].thread, NULL);
    wall = now() - t0;
    used = cpu() - c0;
    const char *version = "none", *cipher = "none";
    for (long i = 0; i < sessions; i++) {
        ok += workers[i].ok;
        errors += workers[i].errors;
        resumed += workers[i].resumed;
        tickets += workers[i].tickets;
        for (int p = 0; p < PHASES; p++)
            spent[p] += workers[i].spent[p];
        if (workers[i].version[0]) {
            version = workers[i].version;
            cipher = workers[i].cipher;
        }
    }
    printf("messages=%ld ok=%ld errors=%ld wall=%.6f cpu=%.6f resumed=%ld tickets=%ld "
           "tls=%s cipher=%s rate=%.1f/s\n",
           messages, ok, errors, wall, used, resumed, tickets, version, cipher,
           wall > 0 ? ok / wall : 0.0);
    printf("wait_ms");
    for (int p = 0; p < PHASES; p++)
        if (!plain || (p != STARTTLS && p != HANDSHAKE && p != EHLO_TLS))
            printf("%c%s:%.3f", p ? ',' : '=', phase_names[p], spent[p] * 1000 / messages);
    printf("\n");
    if (errors)
        fprintf(stderr, "tls_source: %ld error(s) in %ld messages (%ld sent)\n", errors,
                messages, ok);
    return errors ? 1 : 0;
}
