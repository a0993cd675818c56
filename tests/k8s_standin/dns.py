"""Cluster DNS for stand-in pods: answers from the API objects at the moment of the query.

What CoreDNS's kubernetes plugin answers that the pipeline relies on:
`<hostname>.<subdomain>.<namespace>.svc.<domain>` -> the pod IP of a ready-to-run pod with that
hostname and subdomain, selected by a headless Service named `<subdomain>`; NXDOMAIN until both
exist (a rank started before its peers retries, as it must on a cluster). Anything else in the
cluster domain is NXDOMAIN; names outside it are REFUSED (no upstream: pods have no internet here).
Pods get `/etc/resolv.conf` from `resolv_conf()`, with the search path and ndots a kubelet writes.
"""
from __future__ import annotations

from typing import Callable

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

TTL = 5  # short, as CoreDNS's default for pods behind a headless Service (30 s there; 5 s keeps tests quick)


def resolv_conf(nameserver: str, namespace: str, domain: str) -> str:
    search = f"{namespace}.svc.{domain} svc.{domain} {domain}"
    return f"search {search}\nnameserver {nameserver}\noptions ndots:5\n"


def hosts_file(pod_ip: str, hostname: str, subdomain: str | None, namespace: str, domain: str) -> str:
    """The kubelet's managed /etc/hosts: localhost, then the pod's own names on its own IP."""
    names = f"{hostname}.{subdomain}.{namespace}.svc.{domain}\t{hostname}" if subdomain else hostname
    return ("# Kubernetes-managed hosts file (stand-in).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{pod_ip}\t{names}\n")


def handler(domain: str, lookup: Callable[[str, str, str], str | None]) -> Callable[[bytes], bytes | None]:
    """A UDP handler for podnet.PodNetwork.serve_udp; lookup(hostname, subdomain, namespace) -> IP | None."""
    suffix = f".svc.{domain}."

    def answer(packet: bytes) -> bytes | None:
        request = DNSRecord.parse(packet)
        reply = request.reply()
        qname, qtype = str(request.q.qname).lower(), request.q.qtype
        if not qname.endswith(f".{domain}.") and qname != f"{domain}.":
            reply.header.rcode = RCODE.REFUSED
            return reply.pack()
        parts = qname[: -len(suffix)].split(".") if qname.endswith(suffix) else []
        ip = lookup(*parts) if len(parts) == 3 else None
        if ip is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=TTL))
        # An AAAA query for a name that exists: NOERROR with no answer (the pod network is IPv4 only).
        return reply.pack()

    return answer
