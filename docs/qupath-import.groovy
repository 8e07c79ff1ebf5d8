/*
 * Import a HoVerServe job's nuclei into the image open in QuPath (0.4 – 0.7).
 *
 * Open the slide the job analysed, paste this script into Automate → Script editor, fill in the
 * three settings below and run it. It asks the server for the job's status, downloads the one
 * QuPath file of the results (nuclei.geojson.gz, or nuclei.zip for large slides), and adds every
 * nucleus to the image's hierarchy with QuPath's own importer (PathIO.readObjects), exactly as
 * drag and drop would. Nothing is written to the image until the whole file has been read.
 *
 * Large slides: each entry of nuclei.zip is read in turn and needs ~1.3 GB of heap; the objects
 * themselves keep ~0.7 GB per million nuclei (Edit → Preferences → Maximum memory).
 */

import groovy.json.JsonSlurper
import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.StandardCopyOption
import java.util.zip.GZIPInputStream
import qupath.lib.io.PathIO

// ---------------------------------------------------------------------------- settings
def SERVER = "http://localhost:8000"          // the HoVerServe API, as the job was submitted to
def JOB_ID = "paste-the-job-id-here"          // `hoverserve jobs list` or the submit output
def API_KEY = System.getenv("HOVERSERVE_API_KEY") ?: ""   // empty when the server has no keys
// ------------------------------------------------------------------------------------

def imageData = getCurrentImageData()
if (imageData == null)
    throw new IllegalStateException("Open the slide the job analysed first")

def http = HttpClient.newBuilder().followRedirects(HttpClient.Redirect.NORMAL).build()

def request = { URI uri ->
    def builder = HttpRequest.newBuilder(uri).GET()
    if (API_KEY)
        builder.header("Authorization", "Bearer " + API_KEY)
    return builder.build()
}

// 1. The job's status: its state and the download URL of every result.
def base = URI.create(SERVER.endsWith("/") ? SERVER : SERVER + "/")
def statusUri = base.resolve("v1/jobs/" + JOB_ID)
def reply = http.send(request(statusUri), HttpResponse.BodyHandlers.ofString())
if (reply.statusCode() != 200)
    throw new IOException("GET " + statusUri + " answered " + reply.statusCode() + ": " + reply.body())
def job = new JsonSlurper().parseText(reply.body())
if (job.state != "succeeded")
    throw new IllegalStateException("Job " + JOB_ID + " is " + job.state + ", not succeeded yet")

// 2. The one QuPath file: nuclei.geojson.gz when everything fits, else nuclei.zip.
def name = ["nuclei.geojson.gz", "nuclei.zip"].find { job.results.containsKey(it) }
if (name == null)
    throw new IllegalStateException("Job " + JOB_ID + " has no QuPath file; results: " + job.results.keySet())
def fileUri = base.resolve(job.results[name] as String)
def folder = Files.createTempDirectory("hoverserve-")
def download = folder.resolve(name)
def got = http.send(request(fileUri), HttpResponse.BodyHandlers.ofFile(download))
if (got.statusCode() != 200)
    throw new IOException("GET " + fileUri + " answered " + got.statusCode())
print "Downloaded " + name + " (" + Files.size(download) + " bytes)"

// 3. QuPath's importer reads .geojson and .zip; a .gz is unpacked to plain GeoJSON first.
Path readable = download
if (name.endsWith(".gz")) {
    readable = folder.resolve("nuclei.geojson")
    new GZIPInputStream(Files.newInputStream(download)).withCloseable { input ->
        Files.copy(input, readable, StandardCopyOption.REPLACE_EXISTING)
    }
    Files.delete(download)
}

// 4. Read every object (all entries of a zip), then add them under the hierarchy's root.
def objects = PathIO.readObjects(readable.toFile())
addObjects(objects)
fireHierarchyUpdate()
print "Imported " + objects.size() + " objects from job " + JOB_ID

Files.delete(readable)
Files.delete(folder)
