"""Create the Plone site if it is missing; idempotent.

    bin/client1 run scripts/create_site.py [site_id]

Runs in its own process next to the running clients (as a ZEO client of its own).
It creates a Classic UI Plone site with the `classic` distribution of
plone.classicui (Plone 6.2: Products.CMFPlone.factory.addPloneSite with
distribution_name), without example content, then commits.
`app` is given by `bin/client<n> run`.
"""

import os
import sys
import time

import transaction
from AccessControl.SecurityManagement import newSecurityManager
from AccessControl.SpecialUsers import system
from Products.CMFPlone.factory import addPloneSite
from Testing.makerequest import makerequest
from zope.component.hooks import setSite
from zope.globalrequest import setRequest

# bin/client<n> run makes sys.argv [interpreter, "-c", script, args...]
ARGS = sys.argv[sys.argv.index("-c") + 2 :] if "-c" in sys.argv else sys.argv[1:]
SITE_ID = ARGS[0] if ARGS else os.environ.get("PLONE_SITE_ID", "Plone")
TITLE = os.environ.get("PLONE_SITE_TITLE", "Plone site")
LANGUAGE = os.environ.get("PLONE_SITE_LANGUAGE", "en")
TIMEZONE = os.environ.get("PLONE_SITE_TIMEZONE", "UTC")


def main(app):
    app = makerequest(app)
    setRequest(app.REQUEST)
    newSecurityManager(None, system)
    if SITE_ID in app.objectIds():
        print(f"create_site: /{SITE_ID} exists, nothing to do")
        return 0
    started = time.time()
    site = addPloneSite(
        app,
        SITE_ID,
        title=TITLE,
        distribution_name="classic",
        setup_content=False,
        default_language=LANGUAGE,
        portal_timezone=TIMEZONE,
    )
    transaction.get().note(f"create_site.py: created /{SITE_ID}")
    transaction.commit()
    setSite(None)
    print(f"create_site: created /{site.getId()} in {time.time() - started:.1f}s")
    return 0


sys.exit(main(app))  # noqa: F821 (app is given by bin/client<n> run)
