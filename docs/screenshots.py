"""Make the README's pictures of the web inbox again, after the page changes:

    python3 docs/screenshots.py

It starts sheesh in-process on a throwaway Maildir, sends it a few messages of the kinds an app
sends (an HTML newsletter, a receipt with a PDF, a password reset, UTF-8), and takes two
screenshots with headless Chromium (Debian's chromium package): docs/inbox-desktop.png, a
message open at 1280x800, and docs/inbox-phone.png, the list at 390x844.
"""

import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import sheesh  # noqa: E402  (after the path is set)

NEWSLETTER = """<div style="font-family:Georgia,serif;max-width:560px;margin:auto">
<h1 style="color:#2f6fed">November at Acme</h1>
<p>Hello Dana, here is what changed this month.</p>
<h2>New: invoices in your language</h2>
<p>Invoices now follow the language of your account, German and Japanese included.</p>
<p><a href="https://acme.example/news">Read the whole story</a></p>
<p style="color:#888;font-size:12px">You get this because you asked for it.
<a href="https://acme.example/unsubscribe">Unsubscribe</a></p></div>"""


def messages() -> list[tuple[str, list[str], bytes]]:
    made = []

    def message(sender, to, subject, text, html=None, attachment=None, message_id=True):
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = sender, ", ".join(to), subject
        mail["Date"] = "Mon, 30 Nov 2026 09:15:00 +0100"
        if message_id:
            mail["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2].rstrip(">"))
        mail.set_content(text)
        if html:
            mail.add_alternative(html, subtype="html")
        if attachment:
            name, data, kind = attachment
            mail.add_attachment(data, maintype=kind[0], subtype=kind[1], filename=name)
        addresses = [address.rpartition("<")[2].rstrip(">") for address in to]
        made.append((sender.rpartition("<")[2].rstrip(">"), addresses,
                     mail.as_bytes(policy=mail.policy.clone(linesep="\r\n"))))

    message("Shop <noreply@shop.example>", ["dana@example.com"], "Reset your password",
            "Someone asked to reset your password: https://shop.example/reset/8f2a",
            message_id=False)  # an app's mistake, for the picture's Checks badge
    message("Billing <billing@acme.example>", ["dana@example.com", "books@example.com"],
            "Your receipt #2026-1181", "Thank you for your order.",
            attachment=("receipt-2026-1181.pdf", b"%PDF-1.4\n" + b"0" * 48_000,
                        ("application", "pdf")))
    message("Jörg Müller <joerg@buecher.example>", ["dana@example.com"],
            "Grüße aus München: Ihre Bestellung ist unterwegs", "Ihre Bücher sind unterwegs.")
    message("Acme <news@acme.example>", ["dana@example.com"], "November at Acme",
            "November at Acme: invoices in your language.", html=NEWSLETTER,
            attachment=("acme-price-list-2027.csv", b"item,price\n" * 400,
                        ("text", "csv")))
    return made


def screenshot(chromium: str, url: str, size: str, picture: Path, profile: Path) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
                    f"--screenshot={picture}", "--virtual-time-budget=3000", url],
                   check=True, capture_output=True, timeout=60,
                   env={**os.environ, "TMPDIR": str(profile.parent)})  # its socket's folder
    print(f"wrote {picture}")


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("needs Chromium (Debian: apt install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as scratch, sheesh.Server(
            port=0, http_port=0, maildir=Path(scratch) / "mail", hostname="sink.example",
            grace=1) as server:
        for sender, recipients, data in messages():
            with smtplib.SMTP(server.host, server.port, local_hostname="app.example") as client:
                client.sendmail(sender, recipients, data)
            key = server.wait_for_message().key
        profile = Path(scratch) / "profile"
        screenshot(chromium, f"{server.web_url}#/messages/{key}", "1280,800",
                   HERE / "inbox-desktop.png", profile)
        screenshot(chromium, server.web_url, "390,844", HERE / "inbox-phone.png", profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
