"""The web page's static files (HTML, CSS, JavaScript modules), served by :mod:`service.api.web`.

Everything here is written for HoVerServe and installed as package data: no build step, no
third-party bundle, nothing loaded from another server.
"""
